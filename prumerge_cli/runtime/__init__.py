"""Runtimes for exported encoders (imported lazily: each needs its optional extra)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "OrtEncoder":
        from .ort import OrtEncoder

        return OrtEncoder
    if name == "TrtEncoder":
        from .trt import TrtEncoder

        return TrtEncoder
    raise AttributeError(name)


__all__ = ["OrtEncoder", "TrtEncoder"]
