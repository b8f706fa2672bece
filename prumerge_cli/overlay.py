"""PNG overlays: which patches a reducer kept, and which pruned patches merged into each kept one."""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from . import atomic
from .reducers import ReducedTokens

MIN_SIDE = 448


def model_view(image: Image.Image, processor: object, side: int) -> Image.Image:
    """The image as the model sees it: shortest-edge resize plus centre crop (CLIP), or a plain resize."""
    if getattr(processor, "do_center_crop", False):
        return ImageOps.fit(image, (side, side), Image.Resampling.BICUBIC)
    return image.resize((side, side), Image.Resampling.BICUBIC)


def palette(count: int) -> list[tuple[int, int, int]]:
    """`count` distinct, saturated colours (golden-ratio hue steps)."""
    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.61803 * i) % 1.0, 0.85, 1.0))  # type: ignore[misc]
        for i in range(count)
    ]


def render_overlay(view: Image.Image, reduced: ReducedTokens, grid: tuple[int, int]) -> Image.Image:
    """Kept patches at full brightness with a coloured frame; merged pruned patches tinted with their
    centre's colour; patches that only feed the extra token darkened. `reduced` is one row."""
    rows, cols = grid
    scale = max(1, -(-MIN_SIDE // view.width))
    view = view.resize((view.width * scale, view.height * scale), Image.Resampling.NEAREST)
    ph, pw = view.height / rows, view.width / cols
    kept = [int(i) for i in reduced.indices[0] if i >= 0]
    colours = palette(len(kept))
    owner: dict[int, int] = {}
    if reduced.neighbours is not None:
        for slot in range(len(kept)):
            for nb in reduced.neighbours[0, slot].tolist():
                if nb >= 0 and nb not in kept:
                    owner.setdefault(nb, slot)
    base = np.asarray(view, dtype=np.float32)
    out = base * 0.25
    for patch in range(rows * cols):
        r, c = divmod(patch, cols)
        ys, xs = slice(round(r * ph), round((r + 1) * ph)), slice(round(c * pw), round((c + 1) * pw))
        if patch in kept:
            out[ys, xs] = base[ys, xs]
        elif patch in owner:
            out[ys, xs] = 0.45 * base[ys, xs] + 0.55 * np.array(colours[owner[patch]], dtype=np.float32)
    image = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for slot, patch in enumerate(kept):
        r, c = divmod(patch, cols)
        box = (round(c * pw), round(r * ph), round((c + 1) * pw) - 1, round((r + 1) * ph) - 1)
        draw.rectangle(box, outline=colours[slot], width=max(1, scale))
    return image


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic.write_bytes(path, buf.getvalue())
