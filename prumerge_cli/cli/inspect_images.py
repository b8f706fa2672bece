"""`prumerge inspect`: kept-token counts per image, as a table, JSON and PNG overlays."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .. import atomic, devices, dtypes
from ..errors import PrumergeError
from ..models.images import collect_images, image_notes, open_image
from ..overlay import model_view, render_overlay, save_png
from ..progress import Phases
from ..reducers import EXTRA_INDEX, REDUCERS
from ..tables import FoldingTable
from . import app
from .console import out_console
from .options import PARAM_HELP, parse_params


@app.command("inspect")
def inspect_images(
    target: Annotated[Path, typer.Argument(help="A bundle, a model directory (LLaVA and its families) or an export.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or directories of them.")],
    method: Annotated[str | None, typer.Option("--method", "-m", help=f"Override: {', '.join(REDUCERS)}.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help=PARAM_HELP)] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write per-image results to a .json file.")] = None,
    overlay: Annotated[
        Path | None, typer.Option(help="Directory to write PNG overlays of kept/merged patches to.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --json file or --overlay directory.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 8,
    backend: Annotated[str, typer.Option(help="torch (a bundle or model) or ort (an ONNX export).")] = "torch",
    threads: Annotated[
        int | None, typer.Option(min=1, help="ONNX Runtime intra-op threads (default: all cores).")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Where a bundle's model is (default: as recorded).")] = None,
    full_hash: Annotated[bool, typer.Option(help="Check a bundle's model weights by their full hash.")] = False,
    device: Annotated[str, typer.Option(help=f"Where the model runs: {devices.HELP}.")] = "cpu",
    dtype: Annotated[
        str | None, typer.Option(help=f"Tower dtype: {dtypes.HELP} (default: the bundle's, or fp32).")
    ] = None,
) -> None:
    """Show how many visual tokens each image keeps; optionally draw which patches were kept and merged."""
    where = devices.resolve_device(device)
    atomic.check_file_output(json_path, force, (".json",))
    if overlay is not None:
        atomic.check_output(overlay, force)
    dtype = None if dtype is None else dtypes.canonical(dtype)
    paths = collect_images(images)
    if backend == "ort":
        if method or param:
            raise PrumergeError("--method and --param do not apply to an ONNX export")
        from ..runtime.family_ort import FamilyOrtEncoder, is_family_export
        from ..runtime.ort import OrtEncoder

        family = is_family_export(target)
        if family and overlay is not None:
            raise PrumergeError(f"{target} is a tile graph: --overlay draws the torch model's tiles, so inspect the "
                                "bundle for overlays")  # fmt: skip
        encoder = FamilyOrtEncoder(target, threads) if family else OrtEncoder(target, threads)
    elif backend == "torch":
        from ..runtime.ort import is_onnx_export
        from ..targets import open_encoder

        if is_onnx_export(target):
            raise PrumergeError(f"{target} is an ONNX export: inspect it with --backend ort")
        encoder = open_encoder(target, method, parse_params(param), model, full_hash, dtype).to(where)
    else:
        raise PrumergeError(f"unknown backend {backend!r}; choose torch or ort")
    console = out_console()
    from ..families.model import FamilyEncoder
    from ..runtime.family_ort import FamilyOrtEncoder

    if isinstance(encoder, FamilyEncoder | FamilyOrtEncoder):
        from .inspect_tiles import inspect_family

        inspect_family(encoder, target, paths, json_path, overlay, force, batch_size, console, overlay_names(paths))
        return
    rows: list[dict[str, Any]] = []
    views = []
    with Phases(console) as phases, phases.phase(f"reducing {len(paths)} images", len(paths)) as advance:
        for start in range(0, len(paths), batch_size):
            batch = [open_image(p) for p in paths[start : start + batch_size]]
            out = encoder.encode_images(batch)
            for i, (path, image) in enumerate(zip(paths[start : start + batch_size], batch, strict=True)):
                row = out.row(i)
                kept = [int(x) for x in row.indices[0] if x >= 0]
                rows.append(
                    {
                        "image": str(path),
                        "tokens": int(row.lengths[0]),
                        "kept_patches": kept,
                        "extra_token": bool((row.indices == EXTRA_INDEX).any()),
                    }
                )
                if overlay is not None:
                    view = model_view(image, encoder.processor, encoder.image_size)
                    title = overlay_title(path, encoder.reducer.name, encoder.reducer.params(), len(kept),
                                          encoder.grid, rows[-1]["extra_token"],
                                          image_notes(path, encoder.processor))  # fmt: skip
                    views.append((path, render_overlay(view, row, encoder.grid, title)))
            advance(len(batch))
    n = encoder.grid[0] * encoder.grid[1]
    report = {
        "target": str(target),
        "method": encoder.reducer.name,
        "params": encoder.reducer.params(),
        "num_patches": n,
        "images": rows,
    }
    if overlay is not None:
        with atomic.atomic_dir(overlay, force) as tmp:
            for (_, image), name in zip(views, overlay_names([path for path, _ in views]), strict=True):
                save_png(image, tmp / name)
    if json_path is not None:
        atomic.write_text(json_path, json.dumps(report, indent=2) + "\n")
    print_table(report, console)


def print_table(report: dict[str, Any], console: Console) -> None:
    """The per-image table and the mean of each column."""
    n = report["num_patches"]
    table = FoldingTable(f"{report['method']} on {report['target']}",
                          ["image", "visual tokens", "patches kept", "of patches"])  # fmt: skip
    for row in report["images"]:
        kept = len(row["kept_patches"])
        table.add_row(Path(row["image"]).name, str(row["tokens"]), str(kept), f"{100 * kept / n:.1f}%")
    count = len(report["images"])
    tokens = sum(r["tokens"] for r in report["images"]) / count
    kept = sum(len(r["kept_patches"]) for r in report["images"]) / count
    table.add_section()
    table.add_row("mean", f"{tokens:.1f}", f"{kept:.1f}", f"{100 * kept / n:.1f}%")
    table.print(console)


def overlay_title(path: Path, method: str, params: dict[str, Any], kept: int, grid: tuple[int, int],
                  extra: bool, notes: list[str] | None = None) -> str:  # fmt: skip
    """What an overlay shows: image, method and parameters, kept / total patches, and how the model's view of the
    image differs from the file (`notes`)."""
    settings = ", ".join(f"{k}={v}" for k, v in params.items() if v is not None)
    tail = " + the extra token" if extra else ""
    shown = f" (image {'; '.join(notes)})" if notes else ""
    return f"{path.name}: {method} ({settings}), {kept}/{grid[0] * grid[1]} patches kept{tail}{shown}"


def overlay_names(paths: list[Path]) -> list[str]:
    """PNG names: `STEM.overlay.png`, or, where stems collide, the path below the images' common folder with
    '__' for '/' (a/img.png and b/img.png -> a__img.png.overlay.png, b__img.png.overlay.png)."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return [f"{stem}.overlay.png" for stem in stems]
    absolute = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    return [str(p.relative_to(root)).replace(os.sep, "__") + ".overlay.png" for p in absolute]
