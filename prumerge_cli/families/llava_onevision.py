"""`LlavaOnevisionForConditionalGeneration`: any-resolution tiles of a SigLIP tower (no [CLS]).

- Score: the attention each patch receives in the score layer, averaged over heads and queries (no [CLS] to
  ask), so PruMerge and PruMerge+ here are their received-attention variants.
- Where: as LLaVA-NeXT (projected tokens per tile, after unpadding); where transformers downscales a large
  unpadded grid (`anyres_max_9`, ratio > 1.1) the tokens, scores and keys are downscaled alike and the
  downscaled grid is one tile, since no tile survives the interpolation.
- Budget scope, newlines, positions: as LLaVA-NeXT. An image of a multi-image prompt is one tile, as
  transformers encodes it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    host: ClassVar[str] = "LlavaOnevisionForConditionalGeneration"

    def tiles_per_image(self, image_sizes: torch.Tensor, inputs: dict[str, Any]) -> list[int]:
        per_prompt = inputs.pop("batch_num_images", None)
        tiles = super().tiles_per_image(image_sizes, inputs)
        if per_prompt is None:
            return tiles
        alone = [int(n) == 1 for n in per_prompt for _ in range(int(n))]
        return [t if a else 1 for t, a in zip(tiles, alone, strict=True)]

    def resize(self, tokens, scores, keys, owner, cell):
        rows, cols = tokens.shape[1:]
        max_tiles = int(self.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_tiles * self.side**2))
        if ratio <= 1.1:
            return tokens, scores, keys, owner, cell
        size = [int(rows // ratio), int(cols // ratio)]
        tokens, scores, keys = (None if x is None else F.interpolate(x[None], size, mode="bilinear")[0]
                                for x in (tokens, scores, keys))  # fmt: skip
        return tokens, scores, keys, torch.full((1, *size), -1), torch.arange(size[0] * size[1]).view(1, *size)
