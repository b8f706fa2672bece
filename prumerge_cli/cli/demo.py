"""`prumerge demo`: the main job on the embedded default model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .. import atomic, devices, dtypes
from ..lm.positions import DEFAULT_POSITIONS, POSITIONS_HELP, check_positions
from ..progress import Phases
from ..zoo import FINETUNED_DIR, LLAVA_DIR
from . import app
from .console import out_console


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where bundles and ONNX exports go.")] = Path(
        "demo-out"
    ),
    num_images: Annotated[int, typer.Option(min=1, help="Held-out images to score (6 questions each).")] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size of the latency measurements.")] = 8,
    iters: Annotated[int, typer.Option(min=1, help="Measured timing rounds.")] = 10,
    model: Annotated[
        Path, typer.Option(help="A LLaVA checkpoint of the world (default: the embedded one).")
    ] = LLAVA_DIR,
    finetuned: Annotated[
        Path, typer.Option(help="Fine-tuned bundles of the model to score beside the training-free rows.")
    ] = FINETUNED_DIR,
    force: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    device: Annotated[str, typer.Option(help=f"Where the torch encoders and the LLM run: {devices.HELP}.")] = "cpu",
    dtype: Annotated[str, typer.Option(help=f"Vision tower dtype: {dtypes.HELP}.")] = "fp32",
    positions: Annotated[str, typer.Option(help=POSITIONS_HELP)] = DEFAULT_POSITIONS,
) -> None:
    """Compress the embedded LLaVA with every method, export each to ONNX, and compare them in one table."""
    from ..demo import finetuned_rows, oracle_row, print_finetuned, print_per_type, print_rows, run_demo

    atomic.check_output(output, force)
    check_positions(positions)
    where = devices.resolve_device(device)
    dtype = dtypes.canonical(dtype)
    console = out_console()
    with Phases(console) as phases:
        rows = run_demo(model, output, num_images, batch_size, iters, phases, where, dtype, positions)
        print_rows(rows, num_images, batch_size, console)
        oracle = oracle_row(rows, model, num_images, where, phases, positions)
        print_per_type([*rows, oracle], console)
    if model.resolve() == LLAVA_DIR.resolve():
        console.print("The embedded LLM saw random and object-tilted subsets of its visual tokens in training "
                      f"({LLAVA_DIR.parent / 'MODEL_CARD.md'}): training-free figures are kinder on it than on a stock "
                      "LLaVA.", highlight=False)  # fmt: skip
        tuned, skipped = finetuned_rows(finetuned, model, num_images, where, phases)
    print_finetuned(rows, tuned, console)
    for reason in skipped:
        console.print(f"Fine-tuned bundle skipped, {reason}: fine-tune it again on them.", highlight=False)
    atomic.write_text(output / "demo.json", json.dumps([*rows, oracle, *tuned], indent=2) + "\n")
    console.print(f"demo: {phases.total()} in all; {output / 'demo.json'} holds every row", highlight=False)
