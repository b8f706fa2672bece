"""PNG overlays: which patches a reducer kept, and which pruned patches merged into each kept one."""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

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


def patch_owners(reduced: ReducedTokens) -> tuple[list[int], dict[int, int]]:
    """The kept patches (in output order) and, for each pruned patch merged into one, the slot of its centre."""
    kept = [int(i) for i in reduced.indices[0] if i >= 0]
    owner: dict[int, int] = {}
    if reduced.neighbours is not None:
        for slot in range(len(kept)):
            for nb in reduced.neighbours[0, slot].tolist():
                if nb >= 0 and nb not in kept:
                    owner.setdefault(nb, slot)
    return kept, owner


def render_overlay(view: Image.Image, reduced: ReducedTokens, grid: tuple[int, int], title: str) -> Image.Image:
    """Two panels under a title: the image untouched with every kept patch framed in its own colour, and the
    merge map (each pruned patch that merged into a kept one filled with that patch's colour, patches that only
    feed the extra token greyed), then a legend. `reduced` is one row."""
    rows, cols = grid
    scale = max(1, -(-MIN_SIDE // view.width))
    view = view.convert("RGB").resize((view.width * scale, view.height * scale), Image.Resampling.NEAREST)
    ph, pw = view.height / rows, view.width / cols
    kept, owner = patch_owners(reduced)
    colours = palette(len(kept))

    def box(patch: int) -> tuple[int, int, int, int]:
        r, c = divmod(patch, cols)
        return round(c * pw), round(r * ph), round((c + 1) * pw) - 1, round((r + 1) * ph) - 1

    framed = view.copy()
    base = np.asarray(view, dtype=np.float32)
    merged = base * 0.35 + 0.65 * 96
    for patch, slot in owner.items():
        x0, y0, x1, y1 = box(patch)
        merged[y0 : y1 + 1, x0 : x1 + 1] = 0.3 * base[y0 : y1 + 1, x0 : x1 + 1] + 0.7 * np.array(colours[slot])
    for patch in kept:
        x0, y0, x1, y1 = box(patch)
        merged[y0 : y1 + 1, x0 : x1 + 1] = base[y0 : y1 + 1, x0 : x1 + 1]
    merge_map = Image.fromarray(merged.clip(0, 255).astype(np.uint8))
    for panel in (framed, merge_map):
        draw = ImageDraw.Draw(panel)
        for slot, patch in enumerate(kept):
            draw.rectangle(box(patch), outline=colours[slot], width=max(2, scale))
    font = ImageFont.load_default(size=15)
    gap, footer = 12, 30
    width = 2 * view.width + 3 * gap
    lines = wrap(title, font, width - 2 * gap)
    header = 12 + 20 * len(lines)
    canvas = Image.new("RGB", (width, view.height + header + footer), "white")
    canvas.paste(framed, (gap, header))
    canvas.paste(merge_map, (view.width + 2 * gap, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 6), "\n".join(lines), fill="black", font=font, spacing=5)
    y = header + view.height + 8
    x = gap
    for swatch, outline, label in (
        ("white", colours[0] if colours else "black", "kept patch (framed, its own colour)"),
        (colours[0] if colours else "white", None, "pruned, merged into the kept patch of that colour"),
        ((96, 96, 96), None, "pruned, only in the extra token"),
    ):
        draw.rectangle((x, y, x + 14, y + 14), fill=swatch, outline=outline or "black", width=2 if outline else 1)
        draw.text((x + 20, y), label, fill="black", font=font)
        x += 30 + round(draw.textlength(label, font=font))
    return canvas


def wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken at spaces."""
    lines = [""]
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(candidate) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic.write_bytes(path, buf.getvalue())
