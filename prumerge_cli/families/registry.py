"""The adapter of each host class, by the class's name."""

from __future__ import annotations

from typing import Any

from .base import FamilyAdapter
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen25VLAdapter
from .qwen3_vl import Qwen3VLAdapter

FAMILY_ADAPTERS = (LlavaNextAdapter, LlavaOnevisionAdapter, InternVLAdapter, Gemma3Adapter, Qwen25VLAdapter,
                   Qwen3VLAdapter)  # fmt: skip
ADAPTERS: dict[str, type[FamilyAdapter]] = {cls.host: cls for cls in FAMILY_ADAPTERS}


def adapter_for(model: Any) -> FamilyAdapter | None:
    """The adapter of `model`'s class (by name, so subclasses of other classes never match), or None."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model)
    return None
