"""Open what a command is pointed at: a bundle, a model directory, or an export directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bundle import is_bundle, load
from .encoder import ReducedVisionEncoder


def open_encoder(
    target: str | Path,
    method: str | None = None,
    params: dict[str, Any] | None = None,
    model_dir: Path | None = None,
    full_hash: bool = False,
    dtype: str | None = None,
) -> ReducedVisionEncoder:
    """An encoder from a bundle (optionally with another method or parameters, its model elsewhere, its weights
    checked by their full hash, another dtype) or from a model directory."""
    if is_bundle(target):
        options = {} if dtype is None else {"dtype": dtype}
        return load(target, method, params, model_dir=model_dir, full_hash=full_hash, **options)
    from .families.model import FamilyEncoder, is_family_checkpoint

    if is_family_checkpoint(Path(target)):
        return FamilyEncoder.from_pretrained(target, method or "prumerge", dtype=dtype or "fp32", **(params or {}))  # type: ignore[return-value]
    return ReducedVisionEncoder.from_pretrained(target, method or "prumerge", dtype=dtype or "fp32", **(params or {}))
