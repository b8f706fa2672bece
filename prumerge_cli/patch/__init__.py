"""Patch a model of a host library so that its own `generate` runs with reduced visual tokens (one small module
per host class family; `unpatch` restores the model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import LlavaForConditionalGeneration

from ..bundle import is_bundle, read_bundle
from ..errors import PrumergeError
from ..families.layout import DEFAULT_SCOPE, check_scope
from ..families.registry import ADAPTERS, adapter_for
from ..lm.positions import check_positions
from ..reducers import Reducer, build_reducer
from .transformers_families import patch_family, unpatch_family
from .transformers_llava import patch_llava, unpatch_llava


def reducer_of(bundle_or_method: str | Path, params: dict[str, Any]) -> Reducer:
    """The reducer a bundle records (its parameters updated by `params`), or a method built with `params`."""
    if is_bundle(bundle_or_method):
        record = read_bundle(bundle_or_method)
        if record["method"] == "dynamic":
            raise PrumergeError("a Dynamic-LLaVA bundle acts inside the LM; patch takes training-free reducers")
        return build_reducer(record["method"], **{**record["params"], **params})
    return build_reducer(str(bundle_or_method), **params)


def setting_of(bundle_or_method: str | Path, key: str, given: str | None, default: str) -> str:
    """`given` if set, else the bundle's `key` (bundles before the setting: `default`), else `default`."""
    if given is not None:
        return given
    if is_bundle(bundle_or_method):
        return read_bundle(bundle_or_method).get(key, default)
    return default


def patch(model: Any, bundle_or_method: str | Path, positions: str | None = None, scope: str | None = None,
          **params: Any) -> Any:  # fmt: skip
    """Make `model.generate(**processor(images=..., text=..., return_tensors="pt"))` run with reduced tokens, at
    `positions` and (tiled families) budget `scope`, each by default the bundle's (contiguous and tile for a
    method name; M-RoPE models always keep their original positions). Takes LLaVA and the classes of
    `prumerge_cli.families.registry.ADAPTERS`."""
    unpatch(model)
    reducer = reducer_of(bundle_or_method, params)
    asked = positions
    positions = check_positions(setting_of(bundle_or_method, "positions", positions, "contiguous"))
    scope = check_scope(setting_of(bundle_or_method, "scope", scope, DEFAULT_SCOPE))
    if isinstance(model, LlavaForConditionalGeneration):
        return patch_llava(model, reducer, positions)
    adapter = adapter_for(model)
    if adapter is None:
        names = ", ".join(["LlavaForConditionalGeneration", *ADAPTERS])
        raise PrumergeError(f"patch takes {names}; not {type(model).__name__}")
    if adapter.mrope:
        if asked == "contiguous":
            raise PrumergeError(f"{type(model).__name__} keeps its tokens' 3-D (M-RoPE) positions: positions must be "
                                "original")  # fmt: skip
        positions = "original"
    return patch_family(model, adapter, reducer, positions, scope)


def unpatch(model: Any) -> Any:
    """Undo `patch` (a model that is not patched is returned as it is)."""
    return unpatch_family(unpatch_llava(model))


__all__ = ["patch", "unpatch"]
