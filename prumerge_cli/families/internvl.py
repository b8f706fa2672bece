"""`InternVLForConditionalGeneration`: 448 px tiles of an InternViT, pixel-shuffled 2x2 into the LM's tokens.

- Score: the attention each patch receives in the score layer, averaged over heads and all queries ([CLS]
  included); its [CLS] row is weak on InternVL (FasterVLM #4), so PruMerge here is the received-attention variant.
- Where: after the pixel shuffle, on the projected tokens: a token's score is the mean of its four patches'
  scores and its key their four keys side by side, grouped by the model's own `pixel_shuffle`.
- Budget scope: per tile by default, or once over the image's tiles (thumbnail included).
- Newlines: none (tiles follow each other).
- Positions: contiguous, or original (each token at its place among the image's tiles x `image_seq_length`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import PrumergeError
from ..reducers import TowerSignals
from .base import FamilyAdapter, layer_input, score_layer_index, token_scores
from .layout import ImageLayout, Tile


def placeholder_runs(input_ids: torch.Tensor, token: int) -> list[int]:
    """The length of every run of `token` in the rows of `input_ids`, in order."""
    runs = []
    for row in input_ids.tolist():
        count = 0
        for t in [*row, None]:
            if t == token:
                count += 1
            elif count:
                runs.append(count)
                count = 0
    return runs


class InternVLAdapter(FamilyAdapter):
    host: ClassVar[str] = "InternVLForConditionalGeneration"
    fixed_tiles: ClassVar[bool] = True

    def __init__(self, model: Any):
        super().__init__(model)
        inner = model.model
        self.inner, self.tower, self.projector = inner, inner.vision_tower, inner.multi_modal_projector
        if self.config.vision_feature_select_strategy != "default":
            raise PrumergeError(f"{self.host}: only the 'default' feature strategy ([CLS] dropped) is supported")
        layers = self.tower.encoder.layer
        self.feature_layer = self.config.vision_feature_layer
        self.score_layer = layers[score_layer_index(self.feature_layer, len(layers))]
        self.per_tile = self.config.image_seq_length
        self.side = int(self.per_tile**0.5)

    def shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[T, N, F] per patch to [T, N / 4, 4F] per LM token, as the model shuffles its features."""
        side = int(x.shape[1] ** 0.5)
        out = self.inner.pixel_shuffle(x.reshape(x.shape[0], side, side, -1), self.config.downsample_ratio)
        return out.reshape(x.shape[0], -1, out.shape[-1])

    def tile_signals(self, pixel_values, with_scores):
        """Keys [T, n, 4C]: each token's four patches' keys side by side."""
        with layer_input(self.score_layer) as seen:
            out = self.tower(pixel_values=pixel_values.to(self.model.dtype), output_hidden_states=True)
        hidden = out.last_hidden_state if self.feature_layer == -1 else out.hidden_states[self.feature_layer]
        tokens = self.projector(self.shuffle(hidden[:, 1:]))
        grid = (self.side, self.side)
        if not with_scores:
            return TowerSignals(tokens, None, None, grid)
        scores, keys = token_scores(self.score_layer, seen[0], False, True)
        return TowerSignals(tokens, self.shuffle(scores[..., None]).mean(-1), self.shuffle(keys), grid)

    def layouts(self, input_ids, pixel_values, inputs, with_scores):
        counted = inputs.pop("num_patches", None)  # the image processor's count, where it is at hand
        if counted is not None:
            tiles = [int(n) for n in counted]
        else:
            tiles = [run // self.per_tile for run in placeholder_runs(input_ids, self.image_token)]
        if sum(tiles) != pixel_values.shape[0]:
            raise PrumergeError(f"the prompts place {sum(tiles)} tiles but pixel_values holds {pixel_values.shape[0]}")
        signals = self.tile_signals(pixel_values, with_scores)
        tokens, scores, keys = signals.features, signals.scores, signals.keys
        side = self.side
        cells = torch.arange(self.per_tile)
        layouts, start = [], 0
        for count in tiles:
            image = [Tile(tokens[t], None if scores is None else scores[t], None if keys is None else keys[t],
                          (side, side), (t - start) * self.per_tile + cells,
                          torch.full((self.per_tile,), t - start), cells)
                     for t in range(start, start + count)]  # fmt: skip
            layouts.append(ImageLayout(image, count * self.per_tile, (side, side)))
            start += count
        return layouts
