"""`ReducedVisionEncoder`: a checkpoint's vision tower, a reducer and (for LLaVA) the projector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .devices import module_device
from .dtypes import canonical
from .lm.positions import DEFAULT_POSITIONS, check_positions
from .models.images import preprocess
from .models.loading import LoadedModel, load_model
from .models.tower import ScoreDtype, VisionTower
from .reducers import ReducedTokens, Reducer, TowerSignals, build_reducer


def project_tokens(projector: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Apply the LLaVA projector and keep padding slots at zero."""
    mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
    return projector(tokens) * mask[..., None].to(tokens.dtype)


class ReducedVisionEncoder(nn.Module):
    """Call on `pixel_values [B, 3, H, W]` to get `ReducedTokens` (projected if `project=True`)."""

    def __init__(
        self,
        model: LoadedModel,
        reducer: Reducer,
        model_dir: Path,
        dtype: str = "fp32",
        score_layer: int | None = None,
        score_dtype: ScoreDtype = "model",
        positions: str = DEFAULT_POSITIONS,
    ):
        super().__init__()
        self.model = model
        self.tower = VisionTower(model.vision, model.family, model.feature_layer, score_layer)
        self.reducer = reducer
        self.projector = model.projector
        self.processor = model.processor
        self.model_dir = model_dir
        self.dtype_name = canonical(dtype)
        self.score_layer = score_layer
        self.score_dtype: ScoreDtype = score_dtype
        self.positions = check_positions(positions)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        method: str = "prumerge",
        *,
        dtype: str = "fp32",
        attn_implementation: str = "sdpa",
        score_layer: int | None = None,
        score_dtype: ScoreDtype = "model",
        positions: str = DEFAULT_POSITIONS,
        **params: Any,
    ) -> ReducedVisionEncoder:
        """Load a CLIP, SigLIP or LLaVA checkpoint from a local directory and attach reducer `method`; `positions`
        (`lm.positions.POSITIONS`) is where the LM places the reduced tokens."""
        reducer = build_reducer(method, **params)
        model = load_model(model_dir, dtype=dtype, attn_implementation=attn_implementation)
        return cls(model, reducer, Path(model_dir).resolve(), dtype, score_layer, score_dtype, positions)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, project: bool = False) -> ReducedTokens:
        """Reduce a batch of preprocessed images (moved to the encoder's device); `project=True` applies the LLaVA
        projector."""
        pixel_values = pixel_values.to(module_device(self))
        signals = self.tower(pixel_values, with_scores=self.reducer.needs_scores, score_dtype=self.score_dtype)
        out = self.reduce(signals)
        if project and self.projector is not None:
            out.tokens = project_tokens(self.projector, out.tokens, out.lengths)
        return out

    def reduce(self, signals: TowerSignals) -> ReducedTokens:
        """The reducer's tokens of the tower's signals, marked with the full patch count under
        `positions=original`."""
        out = self.reducer(signals)
        out.span = signals.features.shape[1] if self.positions == "original" else None
        return out

    @property
    def image_size(self) -> int:
        """Side of the square input in pixels."""
        return self.tower.vision.config.image_size

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid."""
        return self.tower.grid

    def encode_images(self, images: list[Image.Image], project: bool = False) -> ReducedTokens:
        """Preprocess PIL images with the checkpoint's processor, then reduce them."""
        return self(preprocess(self.processor, images), project=project)

    def settings(self) -> dict[str, Any]:
        """What a bundle records to rebuild this encoder."""
        return {
            "method": self.reducer.name,
            "params": self.reducer.params(),
            "dtype": self.dtype_name,
            "score_layer": self.score_layer,
            "score_dtype": self.score_dtype,
            "positions": self.positions,
        }

    def save(self, bundle_dir: str | Path, force: bool = False) -> Path:
        """Write a bundle (`reducer.json`) that `prumerge_cli.load` turns back into this encoder."""
        from .bundle import write_bundle

        return write_bundle(self, Path(bundle_dir), force=force)
