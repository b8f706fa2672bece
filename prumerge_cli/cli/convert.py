"""`prumerge convert`: upstream checkpoints to Hugging Face LLaVA directories and prumerge bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import PrumergeError
from ..progress import Phases
from . import app
from .console import out_console

LAYOUTS = ("dynamic-llava", "prumerge-lora")
TOWER_HELP = (
    "Local CLIP checkpoint named by the source's mm_vision_tower (its config; its weights if the source has none)."
)


@app.command()
def convert(
    source: Annotated[
        Path, typer.Argument(help="The upstream checkpoint (dynamic-llava) or LoRA (prumerge-lora) directory.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write: OUT/model and OUT/bundle.")],
    layout: Annotated[str, typer.Option("--from", help=f"Upstream layout: {', '.join(LAYOUTS)}.")] = "dynamic-llava",
    vision_tower: Annotated[Path | None, typer.Option(help=TOWER_HELP)] = None,
    base: Annotated[
        Path | None, typer.Option(help="prumerge-lora: the original-LLaVA checkpoint it was trained on.")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="prumerge-lora: what it was trained with, prumerge or prumerge+.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Convert an upstream checkpoint into a Hugging Face LLaVA directory (OUT/model) and a bundle using it
    (OUT/bundle): an official Dynamic-LLaVA checkpoint (original-LLaVA names, predictors, sparse_config), or an
    upstream PruMerge LoRA directory with its --base checkpoint (a fine-tuned bundle). Weights are read from
    safetensors or with `torch.load(weights_only=True)`."""
    if layout not in LAYOUTS:
        raise PrumergeError(f"--from takes {', '.join(LAYOUTS)}; got {layout!r}")
    if vision_tower is None:
        raise typer.BadParameter("the source's vision tower is needed (a local CLIP directory)",
                                 param_hint="--vision-tower")  # fmt: skip
    console = out_console()
    if layout == "dynamic-llava":
        from ..convert.dynamic_llava import convert_dynamic_llava

        with Phases(console) as phases, phases.phase(f"converting {source}"):
            bundle = convert_dynamic_llava(source, vision_tower, output, force)
        console.print(f"wrote {output / 'model'} (Hugging Face LLaVA) and {bundle} (Dynamic-LLaVA bundle)")
        return
    if base is None or method is None:
        raise typer.BadParameter("--from prumerge-lora needs --base and --method", param_hint="--base")
    from ..convert.prumerge_lora import convert_prumerge_lora

    with Phases(console) as phases, phases.phase(f"converting {source} on {base}"):
        bundle = convert_prumerge_lora(source, base, vision_tower, method, output, force)
    console.print(f"wrote {output / 'model'} (Hugging Face LLaVA) and {bundle} (fine-tuned {method} bundle)")
