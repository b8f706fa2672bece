"""prumerge: visual-token reduction for LLaVA-style models, with export and benchmarks."""

from .bundle import load
from .encoder import ReducedVisionEncoder
from .errors import PrumergeError
from .patch import patch, unpatch
from .reducers import EXTRA_INDEX, PAD_INDEX, ReducedTokens, build_reducer

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
