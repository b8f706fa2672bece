"""Safe, selective reading of checkpoint weights (safetensors, or `torch.load(weights_only=True)`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import PrumergeError


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files: `*.safetensors`, else `pytorch_model*.bin`."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise PrumergeError(f"{model_dir} has no weights (*.safetensors or pytorch_model*.bin)")
    return files


def read_tensors(files: list[Path], rename: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """Tensors whose key `rename` maps to a new name (None skips the key); reads only those tensors."""
    out: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        new = rename(key)
                        if new is not None:
                            out[new] = f.get_tensor(key)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                out.update({new: t for key, t in state.items() if (new := rename(key)) is not None})
        except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
            raise PrumergeError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    return out


def hash_files(files: list[Path]) -> str:
    """sha256 over the files' contents, in the given order."""
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
