"""Patch a model of a host library so that its own `generate` runs with reduced visual tokens (one small module
per host library; `unpatch` restores the model)."""

from .transformers_llava import patch, unpatch

__all__ = ["patch", "unpatch"]
