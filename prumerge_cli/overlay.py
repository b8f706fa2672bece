"""PNG overlays: which patches a reducer kept, and which pruned patches merged into each kept one."""

from __future__ import annotations

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


DISTINCT = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
            (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128))  # fmt: skip
"""Colours told apart at a glance (a published list of 20 distinct colours, less its greys)."""
NEAR = 110.0
"""RGB distance under which a frame colour would be mistaken for one of the image's own colours."""
KEEP_AT_LEAST = 8
"""Colours left for the frames however many the image's own colours rule out."""


def image_colours(view: Image.Image, share: float = 0.02) -> list[tuple[int, int, int]]:
    """The image's own colours: those of a 12-colour quantisation that cover at least `share` of it."""
    quantised = view.convert("RGB").quantize(colors=12)
    flat = quantised.getpalette() or []
    counts = quantised.getcolors() or []
    total = view.width * view.height
    return [tuple(flat[3 * i : 3 * i + 3]) for n, i in counts if n >= share * total]  # type: ignore[misc]


def frame_colours(view: Image.Image) -> list[tuple[int, int, int]]:
    """`DISTINCT` less the colours close to the image's own (the farthest `KEEP_AT_LEAST` at least)."""
    own = np.array(image_colours(view), dtype=np.float32).reshape(-1, 3)
    candidates = np.array(DISTINCT, dtype=np.float32)
    if not len(own):
        return list(DISTINCT)
    distance = np.linalg.norm(candidates[:, None, :] - own[None, :, :], axis=-1).min(1)
    order = np.argsort(-distance, kind="stable")
    chosen = sorted(i for rank, i in enumerate(order) if distance[i] >= NEAR or rank < KEEP_AT_LEAST)
    return [DISTINCT[i] for i in chosen]


def palette(kept: list[int], grid: tuple[int, int], colours: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """A colour per kept patch from `colours`: kept patches within two patches of each other never share one
    while enough colours remain (greedy, the least used first), so that neighbouring merge groups stay apart."""
    cols = grid[1]
    used = [0] * len(colours)
    chosen: list[int] = []
    for slot, patch in enumerate(kept):
        r, c = divmod(patch, cols)
        near = {chosen[j] for j, other in enumerate(kept[:slot])
                if max(abs(other // cols - r), abs(other % cols - c)) <= 2}  # fmt: skip
        free = [k for k in range(len(colours)) if k not in near] or list(range(len(colours)))
        pick = min(free, key=lambda k: (used[k], k))
        used[pick] += 1
        chosen.append(pick)
    return [colours[k] for k in chosen]


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
    colours = palette(kept, grid, frame_colours(view))

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
