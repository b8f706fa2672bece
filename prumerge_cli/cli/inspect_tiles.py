"""`prumerge inspect` on a tiled or pooled family: per image, the tokens its LM receives (kept plus newlines) of
the stock count and the count each tile keeps, as a table, JSON and PNG overlays of the tiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from .. import atomic
from ..families.model import FamilyEncoder
from ..models.images import open_image
from ..overlay import save_png
from ..overlay_tiles import render_tiles, tile_picture
from ..progress import Phases
from ..runtime.family_ort import FamilyOrtEncoder
from ..tables import FoldingTable


def inspect_family(encoder: FamilyEncoder | FamilyOrtEncoder, target: Path, paths: list[Path],
                   json_path: Path | None, overlay: Path | None, force: bool, batch_size: int, console: Console,
                   names: list[str]) -> None:  # fmt: skip
    """Reduce `paths` in batches; print the table, write the JSON report and the overlays (`names`, from the torch
    encoder's tiles) if asked. A tile graph's pixel tiles are the tiles it reduced."""
    rows: list[dict[str, Any]] = []
    pictures = []
    with Phases(console) as phases, phases.phase(f"reducing {len(paths)} images", len(paths)) as advance:
        for start in range(0, len(paths), batch_size):
            batch = [open_image(p) for p in paths[start : start + batch_size]]
            if isinstance(encoder, FamilyEncoder):
                pixel_values, layouts = encoder.layouts(batch)
                images = encoder.reduce_layouts(layouts)
                tiles = encoder.tile_pixels(pixel_values, layouts)
            else:
                images = encoder.encode_images(batch)
                layouts, tiles = [None] * len(batch), [None] * len(batch)
            for path, layout, image, pixels in zip(paths[start : start + batch_size], layouts, images, tiles,
                                                   strict=True):  # fmt: skip
                kept = sum(image.kept_per_tile)
                count = len(image.kept_per_tile) if pixels is None else len(pixels)
                rows.append({"image": str(path), "pixel_tiles": count, "tokens": len(image.tokens),
                             "stock_tokens": image.span, "newlines": len(image.tokens) - kept,
                             "kept_per_tile": image.kept_per_tile,
                             "kept_cells": list(map(list, zip(image.kept_sources.tolist(), image.kept_cells.tolist(),
                                                              strict=True)))})  # fmt: skip
                if overlay is not None and isinstance(encoder, FamilyEncoder) and layout is not None:
                    title = overlay_title(path, encoder, rows[-1], any(t.sources[0] < 0 for t in layout.tiles))
                    views = [tile_picture(p.float().numpy(), encoder.processor) for p in pixels]
                    pictures.append(render_tiles(views, layout, image, encoder.processor, title))
            advance(len(batch))
    report = {"target": str(target), "family": encoder.family, "method": encoder.method_label,
              "params": encoder.reducer.params(), "scope": encoder.scope, "images": rows}  # fmt: skip
    if overlay is not None:
        with atomic.atomic_dir(overlay, force) as tmp:
            for picture, name in zip(pictures, names, strict=True):
                save_png(picture, tmp / name)
    if json_path is not None:
        atomic.write_text(json_path, json.dumps(report, indent=2) + "\n")
    print_table(report, console)


def overlay_title(path: Path, encoder: FamilyEncoder, row: dict[str, Any], downscaled: bool) -> str:
    """What a tile overlay shows: image, family, method and settings, the LM's tokens of the stock count."""
    settings = ", ".join(f"{k}={v}" for k, v in encoder.reducer.params().items() if v is not None)
    tail = "; the grid transformers downscales is reduced as one tile and not drawn" if downscaled else ""
    counts = f"{row['tokens']} of {row['stock_tokens']} tokens to the LM, {row['newlines']} of them newlines"
    return f"{path.name} ({encoder.family}): {encoder.method_label} ({settings}), scope {encoder.scope}: {counts}{tail}"


def print_table(report: dict[str, Any], console: Console) -> None:
    """The per-image table and the mean of the counts."""
    table = FoldingTable(f"{report['method']} on {report['target']} ({report['family']}, scope {report['scope']})",
                         ["image", "tiles", "LM tokens", "of stock", "newlines", "kept per tile"])  # fmt: skip
    for row in report["images"]:
        table.add_row(Path(row["image"]).name, str(row["pixel_tiles"]), str(row["tokens"]), str(row["stock_tokens"]),
                      str(row["newlines"]), " ".join(map(str, row["kept_per_tile"])))  # fmt: skip
    count = len(report["images"])
    mean = {k: sum(r[k] for r in report["images"]) / count for k in ("tokens", "stock_tokens", "newlines")}
    table.add_section()
    table.add_row("mean", "", f"{mean['tokens']:.1f}", f"{mean['stock_tokens']:.1f}", f"{mean['newlines']:.1f}", "")
    table.print(console)
