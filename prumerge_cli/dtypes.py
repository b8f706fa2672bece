"""One spelling of dtypes across the CLI and the library: fp32, fp16, bf16 (float32, float16, bfloat16, half
accepted as aliases, so bundles written with the long names still read)."""

from __future__ import annotations

import torch

from .errors import PrumergeError

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
HELP = "fp32, fp16 or bf16"


def canonical(name: str, allowed: tuple[str, ...] = tuple(TORCH_DTYPES)) -> str:
    """The short name of a dtype; a clean error naming the choices for anything else."""
    short = ALIASES.get(name, name)
    if short not in allowed:
        raise PrumergeError(f"unsupported dtype {name!r}; choose {', '.join(allowed)}")
    return short


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name (short or alias)."""
    return TORCH_DTYPES[canonical(name)]
