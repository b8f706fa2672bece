"""Run a vision tower only as far as the reducer needs, and extract its score signals."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import PrumergeError
from ..reducers.base import TowerSignals
from .loading import Family
from .scores import cls_row, received_attention

ScoreDtype = Literal["model", "float32"]


class VisionTower(nn.Module):
    """Features of `feature_layer` (CLS removed) and, on request, the score layer's signals.

    Hidden state i is the input of encoder layer i (0 = embeddings). The score layer defaults to the
    layer right after the feature layer (23 for feature layer -2 of a 24-layer tower, as PruMerge), so its
    keys belong to the very tokens that get merged; for last-layer features it is the last layer.
    Layers past both are never run, nor is anything of the score layer beyond its q/k projections.
    """

    def __init__(self, vision: nn.Module, family: Family, feature_layer: int, score_layer: int | None = None):
        super().__init__()
        self.vision = vision
        self.family = family
        num_layers = len(vision.encoder.layers)
        if not -(num_layers + 1) <= feature_layer <= num_layers:
            raise PrumergeError(f"feature layer {feature_layer} is out of range for {num_layers} layers")
        if score_layer is not None and not -num_layers <= score_layer < num_layers:
            raise PrumergeError(f"score layer {score_layer} is out of range for {num_layers} layers")
        self.feature_index = feature_layer % (num_layers + 1)
        default = min(self.feature_index, num_layers - 1)
        self.score_index = default if score_layer is None else score_layer % num_layers
        config = vision.config
        side = config.image_size // config.patch_size
        self.grid = (side, side)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (CLS excluded)."""
        return self.grid[0] * self.grid[1]

    @property
    def has_cls(self) -> bool:
        """Whether token 0 is a [CLS] token."""
        return self.family == "clip"

    def forward(
        self, pixel_values: torch.Tensor, with_scores: bool = True, score_dtype: ScoreDtype = "model"
    ) -> TowerSignals:
        """Run the tower; `with_scores=False` stops at the feature layer."""
        v = self.vision
        h = v.embeddings(pixel_values.to(v.embeddings.patch_embedding.weight.dtype))
        if self.has_cls:
            h = v.pre_layrnorm(h)
        stop = max(self.feature_index, self.score_index) if with_scores else self.feature_index
        features = score_input = h
        for i in range(stop + 1):
            if i == self.feature_index:
                features = h
            if i == self.score_index:
                score_input = h
            if i < stop:
                h = v.encoder.layers[i](h, None)
        start = 1 if self.has_cls else 0
        if not with_scores:
            return TowerSignals(features[:, start:], None, None, self.grid)
        scores, keys = self._scores(score_input, score_dtype)
        return TowerSignals(features[:, start:], scores, keys[:, start:], self.grid)

    def _scores(self, h: torch.Tensor, score_dtype: ScoreDtype) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.vision.encoder.layers[self.score_index]
        z = layer.layer_norm1(h)
        keys = layer.self_attn.k_proj(z)
        dtype = torch.float32 if score_dtype == "float32" else keys.dtype
        if self.has_cls:
            return cls_row(layer.self_attn.q_proj(z[:, :1]).to(dtype), keys.to(dtype)), keys
        # SigLIP has no CLS: the mean attention each patch receives, over heads and queries.
        queries = layer.self_attn.q_proj(z).to(dtype)
        return received_attention(queries, keys.to(dtype), layer.self_attn.num_heads), keys
