"""How a bundle refers to its model: the path relative to the bundle (the absolute path as a fallback, `--model`
as an override), and the weight files' fingerprints (size, modification time, sha256 of the first MiB) beside
their full sha256, so that loading checks them in milliseconds and hashes everything only on request or when a
file's modification time changed (a copy)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .errors import PrumergeError
from .models.weights import hash_files

HEAD_BYTES = 1 << 20


def fingerprint(path: Path) -> dict[str, Any]:
    """Size, modification time and the sha256 of the first MiB (the safetensors header and more) of a file."""
    stat = path.stat()
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": head}


def model_record(model_dir: Path, bundle_dir: Path, files: list[Path], model_type: str) -> dict[str, Any]:
    """The bundle's `model` entry for `model_dir`, whose path is stored relative to `bundle_dir`."""
    absolute = model_dir.resolve()
    return {
        "path": os.path.relpath(absolute, bundle_dir.resolve()),
        "absolute_path": str(absolute),
        "model_type": model_type,
        "weights": [f.name for f in files],
        "fingerprints": [fingerprint(f) for f in files],
        "sha256": hash_files(files),
    }


def resolve_model(record: dict[str, Any], bundle_dir: Path, override: Path | None = None) -> Path:
    """The model directory: `override`, else the recorded path relative to the bundle, else the absolute one."""
    if override is not None:
        if not Path(override).is_dir():
            raise PrumergeError(f"--model {override} is not a directory")
        return Path(override)
    recorded = Path(record["path"])
    candidates = [recorded] if recorded.is_absolute() else [Path(bundle_dir) / recorded]
    if record.get("absolute_path"):
        candidates.append(Path(record["absolute_path"]))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    where = " or ".join(str(c) for c in candidates)
    raise PrumergeError(f"the model of bundle {bundle_dir} is not at {where}; pass --model DIR")


def verify_weights(record: dict[str, Any], model_dir: Path, files: list[Path], full: bool = False) -> None:
    """Refuse weights that differ from those the bundle was written for (fingerprints; the full hash if `full`,
    if the bundle has no fingerprints, or if a file's modification time changed)."""
    changed = PrumergeError(f"the weights in {model_dir} are not those the bundle was written for")
    if [f.name for f in files] != record["weights"]:
        raise changed
    prints = record.get("fingerprints")
    if not full and prints:
        now = [fingerprint(f) for f in files]
        if any(
            (a["size"], a["head_sha256"]) != (b["size"], b["head_sha256"]) for a, b in zip(now, prints, strict=True)
        ):
            raise changed
        full = any(a["mtime_ns"] != b["mtime_ns"] for a, b in zip(now, prints, strict=True))
    if (full or not prints) and hash_files(files) != record["sha256"]:
        raise changed
