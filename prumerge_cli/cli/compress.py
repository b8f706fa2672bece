"""`prumerge compress`: configure a reducer on a model and write a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from ..encoder import ReducedVisionEncoder
from ..reducers import REDUCERS
from . import app
from .options import PARAM_HELP, parse_params


@app.command()
def compress(
    model_dir: Annotated[Path, typer.Argument(help="Local checkpoint directory: CLIP, SigLIP or LLaVA.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle directory to write.")],
    method: Annotated[str, typer.Option("--method", "-m", help=f"Reducer: {', '.join(REDUCERS)}.")] = "prumerge",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help=PARAM_HELP)] = None,
    dtype: Annotated[str, typer.Option(help="Tower dtype: float32, float16 or bfloat16.")] = "float32",
    score_layer: Annotated[int | None, typer.Option(help="Encoder layer whose q/k give scores and keys.")] = None,
    score_dtype: Annotated[str, typer.Option(help="'model' (official) or 'float32' scores.")] = "model",
    force: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
) -> None:
    """Configure a reducer on a model, check it runs, and write a bundle (reducer.json)."""
    if score_dtype not in ("model", "float32"):
        raise typer.BadParameter("must be 'model' or 'float32'", param_hint="--score-dtype")
    console = Console()
    with console.status(f"loading {model_dir} and checking {method}..."):
        encoder = ReducedVisionEncoder.from_pretrained(
            model_dir, method, dtype=dtype, score_layer=score_layer, score_dtype=score_dtype, **parse_params(param)
        )
        side = encoder.tower.vision.config.image_size
        probe = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
        encoder(probe)
        encoder.save(output, force=force)
    table = Table(title=f"bundle {output}", show_header=False)
    table.add_row("model", f"{encoder.model_dir} ({encoder.model.model_type})")
    table.add_row("method", method)
    table.add_row("parameters", ", ".join(f"{k}={v}" for k, v in encoder.reducer.params().items()) or "-")
    n = encoder.tower.num_patches
    table.add_row("visual tokens", f"at most {encoder.reducer.max_tokens(n)} of {n} patches")
    console.print(table)
