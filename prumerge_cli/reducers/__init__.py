"""Visual-token reducers behind one interface: `build_reducer(name, **params)`."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

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
        raise PrumergeError(
            f"method {method!r} has no parameter {', '.join(unknown)}; it takes {', '.join(sorted(known)) or 'none'}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in params.items():
        if not _fits(value, hints[key]):
            raise PrumergeError(f"parameter {key}={value!r} of {method!r} should be {_describe(hints[key])}")
    return cls(**params)


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(hint))
    return "null" if hint is type(None) else hint.__name__


__all__ = [
    "EXTRA_INDEX",
    "PAD_INDEX",
    "REDUCERS",
    "ReducedTokens",
    "Reducer",
    "TowerSignals",
    "build_reducer",
]
