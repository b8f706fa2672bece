"""Training checkpoints: the trainable tensors (safetensors) and the optimizer, scaler, RNG, step and log
(plain values and tensors, read back with `weights_only=True`), with the run's settings so that a resume with
other data, batch or rates is refused."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import atomic
from ..errors import PrumergeError

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(directory: Path, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Replace the checkpoint in `directory` atomically."""
    with atomic.atomic_dir(directory, force=True) as tmp:
        save_file(weights, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)


def saved_step(directory: Path) -> int | None:
    """The step a run checkpointed in `directory` goes on from, None where there is no checkpoint."""
    if not (directory / WEIGHTS).is_file() or not (directory / STATE).is_file():
        return None
    return int(torch.load(directory / STATE, weights_only=True)["next_step"])


def load_checkpoint(directory: Path, settings: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and state of `directory`, refused in one line if its settings differ from `settings`."""
    weights, state_file = directory / WEIGHTS, directory / STATE
    if not weights.is_file() or not state_file.is_file():
        raise PrumergeError(f"--resume: no checkpoint in {directory}")
    state = torch.load(state_file, weights_only=True)
    saved = state.get("settings", {})
    changed = [key for key in sorted(set(settings) | set(saved)) if saved.get(key) != settings.get(key)]
    if changed:
        what = ", ".join(f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed[:4])
        raise PrumergeError(f"--resume: the checkpoint was written with other settings ({what}); start over "
                            f"without --resume or restore them")  # fmt: skip
    return load_file(str(weights)), state
