"""`prumerge convert`: upstream checkpoints to Hugging Face LLaVA directories and prumerge bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import PrumergeError
from . import app
from .console import out_console

LAYOUTS = ("dynamic-llava",)
TOWER_HELP = (
    "Local CLIP checkpoint named by the source's mm_vision_tower (its config; its weights if the source has none)."
)


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="The upstream checkpoint directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write: OUT/model and OUT/bundle.")],
    layout: Annotated[str, typer.Option("--from", help=f"Upstream layout: {', '.join(LAYOUTS)}.")] = "dynamic-llava",
    vision_tower: Annotated[Path | None, typer.Option(help=TOWER_HELP)] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Convert an official Dynamic-LLaVA checkpoint (original-LLaVA names, predictors, sparse_config) into a
    Hugging Face LLaVA directory and a dynamic bundle using it. Weights are read from safetensors or with
    `torch.load(weights_only=True)`."""
    if layout not in LAYOUTS:
        raise PrumergeError(f"--from takes {', '.join(LAYOUTS)}; got {layout!r}")
    if vision_tower is None:
        raise typer.BadParameter("the source's vision tower is needed (a local CLIP directory)",
                                 param_hint="--vision-tower")  # fmt: skip
    from ..convert.dynamic_llava import convert_dynamic_llava

    console = out_console()
    with console.status(f"converting {source}..."):
        bundle = convert_dynamic_llava(source, vision_tower, output, force)
    console.print(f"wrote {output / 'model'} (Hugging Face LLaVA) and {bundle} (Dynamic-LLaVA bundle)")
