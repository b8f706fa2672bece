"""Image files in, `pixel_values` out, through the checkpoint's own image processor."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import PrumergeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""What a directory of images is searched for (a GIF's or TIFF's first frame is the image)."""


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories to their image files (sorted); keep files as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                kinds = ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
                raise PrumergeError(f"directory {p} contains no image ({kinds})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise PrumergeError(f"image {p} does not exist")
    if not out:
        raise PrumergeError("no image given")
    return out


def open_image(path: Path) -> Image.Image:
    """An RGB image (transparent pixels on white, as transformers' image processors convert them; a GIF's first
    frame), or a clean error that says why the file is not a readable image."""
    try:
        with Image.open(path) as img:
            if not has_alpha(img):
                return img.convert("RGB")
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    except UnidentifiedImageError:
        reason = "not an image format Pillow can read"
    except IsADirectoryError:
        reason = "it is a directory"
    except OSError as exc:
        reason = exc.strerror or str(exc) or "the file is damaged or cut short"
    except ValueError as exc:
        reason = str(exc)
    raise PrumergeError(f"cannot read image {path}: {reason}")


def has_alpha(image: Image.Image) -> bool:
    """Whether an opened image has transparency (an alpha channel or a transparent palette entry)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def image_notes(path: Path, processor: object) -> list[str]:
    """What the model's view of an image changes that a user should be told: a centre crop to a square, and
    transparency shown on white."""
    with Image.open(path) as img:
        notes = ["transparent pixels on white"] if has_alpha(img) else []
        if img.width != img.height and getattr(processor, "do_center_crop", False):
            notes.insert(0, "centre-cropped to a square as the model's processor does")
    return notes


def preprocess(processor: Any, images: list[Image.Image]) -> torch.Tensor:
    """[B, 3, H, W] float32 pixel values."""
    return processor(images=images, return_tensors="pt")["pixel_values"]
