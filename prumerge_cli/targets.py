"""Open what a command is pointed at: a bundle, a model directory, or an export directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bundle import is_bundle, load
from .encoder import ReducedVisionEncoder


def open_encoder(
    target: str | Path, method: str | None = None, params: dict[str, Any] | None = None
) -> ReducedVisionEncoder:
    """An encoder from a bundle (optionally with another method or parameters) or from a model directory."""
    if is_bundle(target):
        return load(target, method, params)
    return ReducedVisionEncoder.from_pretrained(target, method or "prumerge", **(params or {}))
