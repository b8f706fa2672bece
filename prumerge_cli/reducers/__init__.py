"""Visual-token reducers behind one interface: `build_reducer(name, **params)`."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import PrumergeError
from .base import EXTRA_INDEX, PAD_INDEX, ReducedTokens, Reducer, TowerSignals
from .baselines import GridPool, NoReduction, RandomSubset
from .prumerge import PruMerge, PruMergePlus, TopK

REDUCERS: dict[str, type[Reducer]] = {
    cls.name: cls for cls in (PruMerge, PruMergePlus, TopK, RandomSubset, GridPool, NoReduction)
}


def build_reducer(method: str, **params: Any) -> Reducer:
    """The reducer `method` with `params`; unknown methods or parameters raise `PrumergeError`."""
    cls = REDUCERS.get(method)
    if cls is None:
        raise PrumergeError(f"unknown method {method!r}; choose from {', '.join(REDUCERS)}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(params) - known)
    if unknown:
        raise PrumergeError(f"method {method!r} has no parameter {', '.join(unknown)}; it takes {', '.join(sorted(known)) or 'none'}")
    return cls(**params)


__all__ = [
    "EXTRA_INDEX",
    "PAD_INDEX",
    "REDUCERS",
    "ReducedTokens",
    "Reducer",
    "TowerSignals",
    "build_reducer",
]
