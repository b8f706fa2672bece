"""One adapter per host class of the families beyond LLaVA-1.5: where each one's score comes from, where the
reduction applies, its budget scope, newlines and positions (each module's docstring answers for its class)."""

from __future__ import annotations

from typing import Any

from .base import FamilyAdapter
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .layout import DEFAULT_SCOPE, SCOPE_HELP, SCOPES, ImageTokens, check_scope, reduce_image
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    cls.host: cls for cls in (LlavaNextAdapter, LlavaOnevisionAdapter, InternVLAdapter, Gemma3Adapter)
}


def adapter_for(model: Any) -> FamilyAdapter | None:
    """The adapter of `model`'s class (by name, so subclasses of other classes never match), or None."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model)
    return None


__all__ = ["ADAPTERS", "DEFAULT_SCOPE", "SCOPES", "SCOPE_HELP", "FamilyAdapter", "ImageTokens", "adapter_for",
           "check_scope", "reduce_image"]  # fmt: skip
