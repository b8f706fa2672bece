"""Image files in, `pixel_values` out, through the checkpoint's own image processor."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import PrumergeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories to their image files (sorted); keep files as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PrumergeError(f"directory {p} contains no image (png, jpg, jpeg, webp, bmp)")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise PrumergeError(f"image {p} does not exist")
    if not out:
        raise PrumergeError("no image given")
    return out


def open_image(path: Path) -> Image.Image:
    """An RGB image, or a clean error if the file is not a readable image."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PrumergeError(f"cannot read image {path}: {exc.__class__.__name__}") from None


def preprocess(processor: Any, images: list[Image.Image]) -> torch.Tensor:
    """[B, 3, H, W] float32 pixel values."""
    return processor(images=images, return_tensors="pt")["pixel_values"]
