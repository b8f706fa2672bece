"""Option parsing shared by the CLI commands."""

from __future__ import annotations

import json
from typing import Any

from ..errors import PrumergeError

PARAM_HELP = "Reducer parameter KEY=VALUE (repeatable), e.g. -p knn=16 -p merge=false."


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
