"""PNG overlays of a tiled or pooled image: every pixel tile as the model sees it, its grid of LM tokens, the
tokens it kept framed and the rest dimmed; the base tile first, the others as the processor arranged them."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .families.layout import ImageLayout, ImageTokens
from .overlay import frame_colours, wrap

TILE_SIDE = 224
"""Pixels per tile in the overlay."""
ROW = 6
"""Tiles per row where the family does not arrange them (InternVL's crops and thumbnail)."""


def tile_picture(pixels: np.ndarray, processor: object) -> Image.Image:
    """A [3, H, W] tile of normalised pixel values back to an RGB picture."""
    mean = np.array(getattr(processor, "image_mean", [0.0] * 3), dtype=np.float32)[:, None, None]
    std = np.array(getattr(processor, "image_std", [1.0] * 3), dtype=np.float32)[:, None, None]
    scale = float(getattr(processor, "rescale_factor", 1 / 255))
    rgb = ((pixels * std + mean) / scale).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(rgb)


def framed_tile(
    picture: Image.Image,
    grid: tuple[int, int],
    kept: list[int],
    colour: tuple[int, int, int],
    size: tuple[int, int] = (TILE_SIDE, TILE_SIDE),
) -> Image.Image:
    """The tile at `size` (width, height) with its kept cells framed in `colour` and the others dimmed."""
    rows, cols = grid
    view = np.asarray(picture.convert("RGB").resize(size, Image.Resampling.BICUBIC), np.float32)
    ch, cw = size[1] / rows, size[0] / cols
    shown = view * 0.3 + 0.7 * 110
    boxes = []
    for cell in kept:
        r, c = divmod(cell, cols)
        box = (round(c * cw), round(r * ch), round((c + 1) * cw) - 1, round((r + 1) * ch) - 1)
        shown[box[1] : box[3] + 1, box[0] : box[2] + 1] = view[box[1] : box[3] + 1, box[0] : box[2] + 1]
        boxes.append(box)
    out = Image.fromarray(shown.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for box in boxes:
        draw.rectangle(box, outline=colour, width=1 if min(ch, cw) < 6 else 2)
    return out


def render_tiles(pictures: list[Image.Image], layout: ImageLayout, image: ImageTokens, processor: object,
                 title: str) -> Image.Image:  # fmt: skip
    """One overlay: the title, the base tile (or the only one), then the other tiles in their arrangement, each
    labelled with its kept count."""
    colour = frame_colours(pictures[0])[0]
    kept_at = {s: [] for s in range(len(pictures))}
    for source, cell in zip(image.kept_sources.tolist(), image.kept_cells.tolist(), strict=True):
        if source >= 0:
            kept_at[source].append(cell)
    n = layout.token_grid[0] * layout.token_grid[1]
    if len(pictures) == 1:  # one image at its own aspect (Gemma 3, Qwen)
        return single_panel(pictures[0], layout, kept_at[0], colour, f"{len(kept_at[0])}/{n} kept", title)
    panels = [framed_tile(p, layout.token_grid, kept_at[s], colour) for s, p in enumerate(pictures)]
    labels = [f"{'base' if s == 0 and layout.tile_grid else f'tile {s}'}: {len(kept_at[s])}/{n}"
              for s in range(len(panels))]  # fmt: skip
    if layout.tile_grid:
        rest_rows, rest_cols = layout.tile_grid
    else:
        rest_cols = min(ROW, len(panels))
        rest_rows = -(-len(panels) // rest_cols)
    gap, label = 12, 20
    font = ImageFont.load_default(size=15)
    first = 1 if layout.tile_grid else 0
    width = gap + (TILE_SIDE + gap) * (first + rest_cols)
    lines = wrap(title, font, width - 2 * gap)
    header = 12 + 20 * len(lines)
    height = header + (TILE_SIDE + label + gap) * max(1, rest_rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 6), "\n".join(lines), fill="black", font=font, spacing=5)
    for s, panel in enumerate(panels):
        if first and s == 0:
            x, y = gap, header
        else:
            r, c = divmod(s - first, rest_cols)
            x, y = gap + (TILE_SIDE + gap) * (first + c), header + (TILE_SIDE + label + gap) * r
        canvas.paste(panel, (x, y))
        draw.text((x, y + TILE_SIDE + 2), labels[s], fill="black", font=font)
    return canvas


def single_panel(picture: Image.Image, layout: ImageLayout, kept: list[int], colour: tuple[int, int, int],
                 label: str, title: str) -> Image.Image:  # fmt: skip
    """One image's overlay at its own aspect, fitted into `2 * TILE_SIDE` a side, under its title."""
    scale = 2 * TILE_SIDE / max(picture.size)
    panel = framed_tile(picture, layout.token_grid, kept, colour,
                        (round(picture.width * scale), round(picture.height * scale)))  # fmt: skip
    gap, font = 12, ImageFont.load_default(size=15)
    width = max(panel.width, 2 * TILE_SIDE) + 2 * gap
    lines = wrap(title, font, width - 2 * gap)
    header = 12 + 20 * len(lines)
    canvas = Image.new("RGB", (width, header + panel.height + 20 + gap), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 6), "\n".join(lines), fill="black", font=font, spacing=5)
    canvas.paste(panel, (gap, header))
    draw.text((gap, header + panel.height + 2), label, fill="black", font=font)
    return canvas
