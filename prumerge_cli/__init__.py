"""prumerge: visual-token reduction for LLaVA-style models, with export and benchmarks.

The public names load on first use, so that `prumerge --help` and the light modules need neither torch's model
stack nor transformers."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bundle import load
    from .encoder import ReducedVisionEncoder
    from .errors import PrumergeError
    from .patch import patch, unpatch
    from .reducers import EXTRA_INDEX, PAD_INDEX, ReducedTokens, build_reducer

_HOMES = {
    "EXTRA_INDEX": ".reducers",
    "PAD_INDEX": ".reducers",
    "PrumergeError": ".errors",
    "ReducedTokens": ".reducers",
    "ReducedVisionEncoder": ".encoder",
    "build_reducer": ".reducers",
    "load": ".bundle",
    "patch": ".patch",
    "unpatch": ".patch",
}
__all__ = [
    "EXTRA_INDEX",
    "PAD_INDEX",
    "PrumergeError",
    "ReducedTokens",
    "ReducedVisionEncoder",
    "build_reducer",
    "load",
    "patch",
    "unpatch",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value
