"""`LlavaNextForConditionalGeneration`: any-resolution tiles of a CLIP tower.

- Score: the [CLS] query row of the layer after the feature layer (PruMerge, as LLaVA-1.5).
- Where: on the projected tokens of each tile, after unpadding (tokens in the padding transformers crops off
  are never candidates); the base tile is one tile.
- Budget scope: per tile by default (`layout.DEFAULT_SCOPE`), or once over the image.
- Newlines: one `image_newline` after every row of the unpadded grid that keeps a token, the base tile first
  and without newlines, as transformers packs them.
- Positions: contiguous, or original (each token at its place in the unreduced packed sequence).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from ..errors import PrumergeError
from .base import FamilyAdapter, layer_input, score_layer_index, token_scores
from .layout import ImageLayout, Tile


def to_unpadded(tiles: torch.Tensor, tile_grid: tuple[int, int], side: int, image_size: Any) -> torch.Tensor:
    """[T, side*side, F] values of an image's grid tiles laid out as transformers lays them, [F, rows, cols] of the
    unpadded grid."""
    grid = tiles.view(*tile_grid, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
    return unpad_image(grid.flatten(1, 2).flatten(2, 3), image_size)


class LlavaNextAdapter(FamilyAdapter):
    host: ClassVar[str] = "LlavaNextForConditionalGeneration"

    def __init__(self, model: Any):
        super().__init__(model)
        inner = model.model
        self.tower, self.projector, self.newline = inner.vision_tower, inner.multi_modal_projector, inner.image_newline
        vision = self.config.vision_config
        self.has_cls = vision.model_type == "clip_vision_model"
        strategy = self.config.vision_feature_select_strategy
        if (strategy == "default") != self.has_cls:
            raise PrumergeError(f"{self.host}: the '{strategy}' feature strategy on a {vision.model_type} tower "
                                f"does not give one token per patch")  # fmt: skip
        layers = self.tower.encoder.layers
        self.feature_layer = self.config.vision_feature_layer
        self.score_layer = layers[score_layer_index(self.feature_layer, len(layers))]
        self.side = vision.image_size // vision.patch_size

    @property
    def cls_score(self) -> bool:
        return self.has_cls

    def tiles_per_image(self, image_sizes: torch.Tensor, inputs: dict[str, Any]) -> list[int]:
        """How many tiles the processor made of each image (base included)."""
        return [image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
                for size in image_sizes]  # fmt: skip

    def encode(self, pixel_values: torch.Tensor, with_scores: bool):
        """Projected tokens [T, N, D] of every tile, and (with scores) their scores [T, N] and keys [T, N, C]."""
        with layer_input(self.score_layer) as seen:
            out = self.tower(pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[self.feature_layer]
        tokens = self.projector(hidden[:, 1:] if self.has_cls else hidden)
        if not with_scores:
            return tokens, None, None
        scores, keys = token_scores(self.score_layer, seen[0], self.has_cls, self.has_cls)
        return tokens, scores, keys

    def layouts(self, input_ids, pixel_values, inputs, with_scores):
        image_sizes = inputs.pop("image_sizes")
        counts = self.tiles_per_image(image_sizes, inputs)
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, counts, strict=True)])
        tokens, scores, keys = self.encode(pixel_values.to(self.model.dtype), with_scores)
        layouts, start = [], 0
        for size, n in zip(image_sizes, counts, strict=True):
            rows = slice(start, start + n)
            layouts.append(self.layout(size, tokens[rows], _part(scores, rows), _part(keys, rows)))
            start += n
        return layouts

    def layout(self, image_size, tokens, scores, keys) -> ImageLayout:
        """One image's base tile and unpadded grid tiles, with its newline rows."""
        n = self.side * self.side
        cells = torch.arange(n)
        base = Tile(tokens[0], _part(scores, 0), _part(keys, 0), (self.side, self.side), cells,
                    torch.zeros(n, dtype=torch.long), cells)  # fmt: skip
        if tokens.shape[0] == 1:  # one tile: the base and one newline after it
            row_of = torch.zeros(n + 1, dtype=torch.long)
            return ImageLayout([base], n + 1, (self.side, self.side), self.newline, row_of, torch.tensor([n]))
        tile_grid = get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints,
                                                self.config.vision_config.image_size)  # fmt: skip
        grid = [None if x is None else to_unpadded(x[1:].reshape(x.shape[0] - 1, n, -1), tile_grid, self.side,
                                                   image_size) for x in (tokens, scores, keys)]  # fmt: skip
        owner = torch.arange(1, tokens.shape[0])[:, None, None].expand(-1, n, 1)
        cell = torch.arange(n)[None, :, None].expand(tokens.shape[0] - 1, -1, 1)
        where = [to_unpadded(x.contiguous(), tile_grid, self.side, image_size) for x in (owner, cell)]
        layout = self.grid_layout(base, *self.resize(*grid, *where))
        layout.tile_grid = (int(tile_grid[0]), int(tile_grid[1]))
        return layout

    def resize(self, tokens, scores, keys, owner, cell):
        """The unpadded grid as the LM receives it (OneVision may downscale it)."""
        return tokens, scores, keys, owner, cell

    def grid_layout(self, base: Tile, tokens, scores, keys, owner, cell) -> ImageLayout:
        """The base tile, then one tile per owner (pixel tile) of the unpadded [F, rows, cols] grid, with newline
        rows."""
        n = base.tokens.shape[0]
        rows, cols = tokens.shape[1:]
        span = n + rows * (cols + 1)
        row_of = torch.full((span,), -1, dtype=torch.long)
        row_of[n:] = torch.arange(rows).repeat_interleave(cols + 1)
        places = n + torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None, :]
        tiles = [base]
        for t in torch.unique(owner[0]).tolist():
            mine = owner[0] == t
            r = mine.any(1).nonzero()[:, 0]
            c = mine.any(0).nonzero()[:, 0]
            cut = (slice(None), slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1))
            flat = [None if x is None else x[cut].flatten(1).T for x in (tokens, scores, keys, owner, cell)]
            tiles.append(Tile(flat[0], None if flat[1] is None else flat[1][:, 0], flat[2], (len(r), len(c)),
                              places[cut[1:]].flatten(), flat[3][:, 0], flat[4][:, 0]))  # fmt: skip
        newline_places = n + torch.arange(rows) * (cols + 1) + cols
        return ImageLayout(tiles, span, (self.side, self.side), self.newline, row_of, newline_places)

    def image_output(self, images):
        return BaseModelOutputWithPooling(pooler_output=[i.tokens for i in images])


def _part(x: torch.Tensor | None, index: Any) -> torch.Tensor | None:
    return None if x is None else x[index]
