"""Option parsing shared by the CLI commands."""

from __future__ import annotations

import json
from typing import Any

from ..errors import PrumergeError
from ..exporters.trt_support import PLUGIN_MODES

PARAM_HELP = "Reducer parameter, repeatable: -p knn=16 -p merge=false."

OPTIONAL_VALUES = {"--plugins": ("jit", PLUGIN_MODES)}


def fill_optional_values(args: list[str]) -> list[str]:
    """Give a value to an option written without one: `--plugins` alone means `--plugins jit` (Typer has no
    options whose value is optional). A word after it that is no option and no value is refused by name."""
    filled: list[str] = []
    for i, arg in enumerate(args):
        filled.append(arg)
        if arg in OPTIONAL_VALUES:
            default, values = OPTIONAL_VALUES[arg]
            following = args[i + 1] if i + 1 < len(args) else None
            if following is not None and not following.startswith("-") and following not in values:
                raise PrumergeError(
                    f"{arg} takes {', '.join(values)} (or nothing, meaning {default}); got {following!r}"
                )
            if following not in values:
                filled.append(default)
    return filled


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """`["knn=16", "merge=false"]` -> `{"knn": 16, "merge": False}`; values are JSON, else strings."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PrumergeError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params
