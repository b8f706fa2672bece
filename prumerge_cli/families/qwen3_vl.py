"""`Qwen3VLForConditionalGeneration`: as Qwen2.5-VL (its module docstring), with three differences.

- Score: every vision block attends over the whole image, so the last block's received attention needs no
  window order undone.
- Deepstack: the features the tower's deepstack mergers give every merged token (added to early LM layers at the
  image's positions) are cut to the kept tokens with them; a merged extra token gets none (zeros).
- Positions: the interleaved M-RoPE ids of the stock generation, kept as Qwen2.5-VL keeps them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from .qwen2_5_vl import Qwen25VLAdapter


class Qwen3VLAdapter(Qwen25VLAdapter):
    host: ClassVar[str] = "Qwen3VLForConditionalGeneration"

    def raster_order(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.arange(int(grid.prod(-1).sum()) // self.merge**2)

    def side_features(self, out: Any, sizes: list[int]) -> list[dict[str, torch.Tensor]]:
        per_layer = [torch.split(f, sizes) for f in out.deepstack_features]
        return [{f"deepstack_{k}": layer[i] for k, layer in enumerate(per_layer)} for i in range(len(sizes))]

    def image_output(self, images):
        layers = len(images[0].side) if images else 0
        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=[i.tokens for i in images],
            deepstack_features=[[i.side[f"deepstack_{k}"] for i in images] for k in range(layers)],
        )
