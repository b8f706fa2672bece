"""Reading the JSON files prumerge and Hugging Face write, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import PrumergeError


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """The JSON object in `path`; `missing` is the error when the file does not exist."""
    if not path.is_file():
        raise PrumergeError(missing)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrumergeError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PrumergeError(f"{path} is not a JSON object")
    return data
