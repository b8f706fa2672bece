"""Dynamic-LLaVA: learned predictors that choose vision tokens at prefill and drop generated tokens from the
KV cache while decoding (shared/specs/dynamic_llava.md)."""

from .config import SparseConfig
from .model import DynamicLlava
from .predictors import Predictors

__all__ = ["DynamicLlava", "Predictors", "SparseConfig"]
