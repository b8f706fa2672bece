"""`Gemma3ForConditionalGeneration`: one 896 px SigLIP image pooled 4x4 into 256 LM tokens.

- Score: the attention each patch receives in the last layer, averaged over heads and queries (SigLIP has no
  [CLS]), then averaged over each pooling window as the projector pools the patches; keys pooled alike.
- Where: on the projected (pooled) tokens, the 16 x 16 grid the LM sees.
- Budget scope: one tile per image, so `tile` and `image` agree.
- Newlines: none.
- Positions: contiguous or original; `token_type_ids` (the image's bidirectional attention) are recomputed
  from the shortened prompt, so they are cut together with the tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..reducers import TowerSignals
from .base import FamilyAdapter, layer_input, token_scores
from .layout import ImageLayout, Tile


class Gemma3Adapter(FamilyAdapter):
    host: ClassVar[str] = "Gemma3ForConditionalGeneration"
    fixed_tiles: ClassVar[bool] = True

    def __init__(self, model: Any):
        super().__init__(model)
        inner = model.model
        self.tower, self.projector = inner.vision_tower, inner.multi_modal_projector
        self.score_layer = self.tower.encoder.layers[-1]
        self.side = self.projector.tokens_per_side

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, F] per patch to [B, n, F] per LM token, by the projector's own pooling."""
        side = self.projector.patches_per_image
        grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        return self.projector.avg_pool(grid).flatten(2).transpose(1, 2)

    def tile_signals(self, pixel_values, with_scores):
        with layer_input(self.score_layer) as seen:
            out = self.tower(pixel_values=pixel_values.to(self.model.dtype))
        tokens = self.projector(out.last_hidden_state)
        scores = keys = None
        if with_scores:
            scores, keys = token_scores(self.score_layer, seen[0], False, False)
            scores, keys = self.pool(scores[..., None])[..., 0], self.pool(keys)
        return TowerSignals(tokens, scores, keys, (self.side, self.side))

    def layouts(self, input_ids, pixel_values, inputs, with_scores):
        signals = self.tile_signals(pixel_values, with_scores)
        tokens, scores, keys = signals.features, signals.scores, signals.keys
        n, grid = self.side * self.side, (self.side, self.side)
        cells = torch.arange(n)
        return [ImageLayout([Tile(tokens[b], None if scores is None else scores[b], None if keys is None else keys[b],
                                  grid, cells, torch.zeros(n, dtype=torch.long), cells)], n, grid)
                for b in range(tokens.shape[0])]  # fmt: skip

    def generation_inputs(self, input_ids):
        return {"token_type_ids": (input_ids == self.image_token).long()}
