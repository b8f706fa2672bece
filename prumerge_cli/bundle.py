"""Compressed bundles: `reducer.json` naming the model (path and weight hash) and the reducer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import atomic
from .encoder import ReducedVisionEncoder
from .errors import PrumergeError
from .jsonfiles import read_json_object
from .models.weights import hash_files
from .versions import package_versions

BUNDLE_FILE = "reducer.json"
FORMAT = "prumerge-bundle"
FORMAT_VERSION = 1


def write_bundle(encoder: ReducedVisionEncoder, bundle_dir: Path, force: bool = False) -> Path:
    """Write `bundle_dir/reducer.json` atomically; an existing directory needs `force`."""
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **encoder.settings(),
        "model": {
            "path": str(encoder.model_dir),
            "model_type": encoder.model.model_type,
            "weights": [f.name for f in encoder.model.weight_files],
            "sha256": hash_files(encoder.model.weight_files),
        },
        "versions": package_versions(),
    }
    with atomic.atomic_dir(bundle_dir, force=force) as tmp:
        (tmp / BUNDLE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return bundle_dir


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is a bundle directory."""
    return (Path(path) / BUNDLE_FILE).is_file()


def read_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """The bundle's record, validated."""
    path = Path(bundle_dir) / BUNDLE_FILE
    record = read_json_object(path, f"{bundle_dir} is not a bundle (no {BUNDLE_FILE})")
    if record.get("format") != FORMAT:
        raise PrumergeError(f"{path} is not a prumerge bundle")
    if record.get("format_version") != FORMAT_VERSION:
        version = record.get("format_version")
        raise PrumergeError(f"{path} has bundle format {version}; this prumerge reads {FORMAT_VERSION}")
    return record


def load(
    bundle_dir: str | Path,
    method: str | None = None,
    params: dict[str, Any] | None = None,
    verify: bool = True,
    **options: Any,
) -> ReducedVisionEncoder:
    """Rebuild the encoder a bundle describes; `verify` checks that the model's weights are unchanged.

    `method` replaces the recorded reducer; `params` update the recorded parameters (or, with another method,
    replace them); `options` replace encoder settings (`dtype`, `attn_implementation`, `score_layer`, ...).
    """
    record = read_bundle(bundle_dir)
    if record["method"] == "dynamic":
        raise PrumergeError(f"{bundle_dir} holds learned predictors, which act inside the LLM: `prumerge export` "
                            "writes its decode step and `prumerge bench` measures it")  # fmt: skip
    method = method or record["method"]
    merged = {**(record["params"] if method == record["method"] else {}), **(params or {})}
    settings = {**{k: record[k] for k in ("dtype", "score_layer", "score_dtype")}, **options}
    encoder = ReducedVisionEncoder.from_pretrained(record["model"]["path"], method, **settings, **merged)
    if verify and hash_files(encoder.model.weight_files) != record["model"]["sha256"]:
        raise PrumergeError(f"the weights in {record['model']['path']} changed since bundle {bundle_dir} was written")
    return encoder
