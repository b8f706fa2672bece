"""`prumerge world`: write the procedural world as LLaVA conversation JSON with image files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import atomic
from ..errors import PrumergeError
from ..progress import Phases
from . import app
from .console import out_console


@app.command()
def world(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for data.json and images/.")],
    split: Annotated[str, typer.Option(help="train, val or test (disjoint seed ranges).")] = "train",
    count: Annotated[int, typer.Option(min=1, help="Number of images.")] = 1000,
    lmms: Annotated[
        bool, typer.Option(help="Write lmms-eval's prumerge_world tasks instead (for --include_path OUTPUT).")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing directory.")] = False,
) -> None:
    """Write samples of the embedded model's world in LLaVA's conversation format, or as lmms-eval tasks."""
    from ..zoo.llava_json import write_llava_json
    from ..zoo.world import SPLITS

    if split not in SPLITS:
        raise PrumergeError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    atomic.check_output(output, force)
    console = out_console()
    if lmms:
        from ..evaluation.world_tasks import GROUP, write_world_tasks

        with Phases(console) as phases, phases.phase(f"writing {count} {split} images as lmms-eval tasks"):
            write_world_tasks(output, split, count, force)
        console.print(f"wrote {output}: pass --include_path {output} --tasks {GROUP} to lmms-eval")
        return
    with Phases(console) as phases, phases.phase(f"rendering {count} {split} images", count) as advance:
        path = write_llava_json(output, split, count, force=force, advance=advance)
    console.print(f"wrote {path} and {count} images in {output / 'images'}")
