"""`prumerge eval`: score a bundle with lmms-eval (the world's local tasks, or any task lmms-eval knows), beside
its model with every token if asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import atomic, devices
from ..errors import PrumergeError
from ..progress import Phases
from ..tables import FoldingTable
from . import app
from .console import out_console


@app.command("eval")
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="A bundle (training-free, fine-tuned, Dynamic-LLaVA or a family's).")],
    tasks: Annotated[str, typer.Option(help="Comma-separated lmms-eval tasks or groups, e.g. prumerge_world.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for results.json.")],
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N documents of each task.")] = None,
    baseline: Annotated[
        bool, typer.Option(help="Also score the bundle's checkpoint as it is, every token; print the ratios.")
    ] = False,
    images: Annotated[int, typer.Option(min=1, help="Held-out world images behind the prumerge_world tasks.")] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help=f"Where the model runs: {devices.HELP}.")] = "cpu",
    online: Annotated[bool, typer.Option(help="Let lmms-eval download datasets (default: offline).")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Score a bundle with lmms-eval, offline by default: its results, the visual tokens kept, versions and
    machine go into one JSON."""
    from ..bench.runner import machine
    from ..bundle import read_bundle
    from ..evaluation.run import (
        EvalSettings,
        go_offline,
        headline,
        quiet_lmms_eval,
        require_lmms_eval,
        score,
        task_manager,
    )
    from ..versions import package_versions

    atomic.check_output(output, force)
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if not names:
        raise PrumergeError("--tasks names no task")
    record = read_bundle(bundle)
    kind = record.get("model", {}).get("model_type")
    if "family" not in record and kind != "llava":
        raise PrumergeError(f"{bundle} reduces a {kind} checkpoint, a vision tower alone: eval needs a LLaVA or a "
                            "family checkpoint, whose LM answers")  # fmt: skip
    require_lmms_eval()
    quiet_lmms_eval()
    go_offline(online)
    settings = EvalSettings(names, limit, images, batch_size, str(devices.resolve_device(device)), online)
    console = out_console()
    with Phases(console) as phases:
        with phases.phase("indexing the tasks"):
            manager = task_manager(names, images)
        runs = {}
        for label, every in (("bundle", False), *((("baseline", True),) if baseline else ())):
            with phases.phase(f"scoring the {label} on {', '.join(names)}"):
                runs[label] = score(bundle, settings, manager, every_token=every)
    report: dict[str, Any] = {"bundle": str(bundle), "method": record["method"],
                              "regime": record.get("regime", "training-free"), "tasks": list(names), "limit": limit,
                              **runs["bundle"], "versions": package_versions("lmms_eval", "datasets"),
                              "machine": machine()}  # fmt: skip
    if baseline:
        report["baseline"] = runs["baseline"]
        mine, theirs = headline(runs["bundle"]["results"]), headline(runs["baseline"]["results"])
        report["ratios"] = {t: mine[t] / theirs[t] for t in mine if theirs.get(t)}
    with atomic.atomic_dir(output, force) as tmp:
        (tmp / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_scores(report, console)


def print_scores(report: dict[str, Any], console) -> None:
    """One row per task: the bundle's score, the baseline's and their ratio, and the visual tokens."""
    from ..evaluation.run import headline

    mine = headline(report["results"])
    theirs = headline(report["baseline"]["results"]) if "baseline" in report else {}
    tokens = report["visual_tokens"]
    title = (f"{report['bundle']} ({report['method']}, {report['regime']}): {tokens['mean']:.1f} visual tokens "
             f"[{tokens['min']}-{tokens['max']}]")  # fmt: skip
    if "baseline" in report:
        title += f", every token {report['baseline']['visual_tokens']['mean']:.0f}"
    table = FoldingTable(title, ["task", "score", "every token", "ratio", "questions"])
    samples = report.get("n-samples", {})
    for task, value in mine.items():
        base = theirs.get(task)
        count = samples.get(task, {}).get("effective", "")
        table.add_row(task, f"{100 * value:.1f}", "-" if base is None else f"{100 * base:.1f}",
                      "-" if not base else f"{value / base:.3f}", str(count))  # fmt: skip
    table.print(console)
