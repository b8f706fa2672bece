"""`prumerge bench`: latency, throughput, memory, tokens kept and fidelity, baseline and reduced side by side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
import typer
from rich.console import Console

from .. import atomic, devices, dtypes
from ..errors import PrumergeError
from ..lm.positions import DEFAULT_POSITIONS, POSITIONS_HELP, check_positions
from ..progress import Phases
from . import app
from .console import out_console

if TYPE_CHECKING:
    from ..bench.runner import BenchSettings


def parse_list(text: str, kind=str) -> list:
    """'1,8' -> [1, 8]."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PrumergeError(f"cannot read {text!r} as a comma-separated list") from None


@app.command()
def bench(
    targets: Annotated[
        list[Path],
        typer.Argument(help="Model directories, bundles (incl. predictor bundles) or ONNX exports (one model)."),
    ],
    images: Annotated[Path | None, typer.Option(help="A directory of images to measure on.")] = None,
    synthetic: Annotated[
        int | None, typer.Option(help="Use N held-out images of the procedural world (default when no --images: 8).")
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    backends: Annotated[str, typer.Option(help="Comma-separated: torch, ort, trt.")] = "torch",
    methods: Annotated[str, typer.Option(help="Methods to run on model-directory targets.")] = "prumerge",
    positions: Annotated[str, typer.Option(help=POSITIONS_HELP + " Of --methods; bundles keep theirs.")] = (
        DEFAULT_POSITIONS
    ),
    warmup: Annotated[int, typer.Option(min=0, help="Discarded rounds.")] = 2,
    iters: Annotated[int, typer.Option(min=1, help="Measured rounds.")] = 10,
    threads: Annotated[int | None, typer.Option(min=1, help="torch and ONNX Runtime threads (default: all).")] = None,
    llm: Annotated[
        Path | None, typer.Option(help="A LLaVA checkpoint: LLM prefill/decode and answer fidelity.")
    ] = None,
    llm_shape: Annotated[
        str | None, typer.Option(help="A named LLM shape with random weights, e.g. vicuna-7b:layers=2.")
    ] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompts for --llm fidelity, one per line.")] = None,
    vqa_images: Annotated[int, typer.Option(help="Held-out images for the embedded model's accuracy.")] = 100,
    new_tokens: Annotated[
        int, typer.Option(min=2, help="Tokens generated before the timed decode step (predictor bundles).")
    ] = 48,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON (a .json file).")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Plot latency and fidelity against tokens: a .png, .jpg, .svg or .pdf file.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace existing --json and --plot files.")] = False,
    model: Annotated[Path | None, typer.Option(help="Where the bundles' model is (default: as recorded).")] = None,
    full_hash: Annotated[bool, typer.Option(help="Check the bundles' model weights by their full hash.")] = False,
    device: Annotated[str, typer.Option(help=f"Where the model runs: {devices.HELP}.")] = "cpu",
    dtype: Annotated[str, typer.Option(help=f"Vision tower dtype: {dtypes.HELP} (bf16: torch backend only).")] = "fp32",
) -> None:
    """Measure every variant of one model next to its unreduced baseline, interleaved, on each backend."""
    from ..bench.report import PLOT_FORMATS, print_tables, write_json, write_plot
    from ..bench.runner import BenchSettings, run_bench

    if llm is not None and llm_shape is not None:
        raise PrumergeError("use either --llm or --llm-shape")
    atomic.check_file_output(json_path, force, (".json",))
    atomic.check_file_output(plot, force, tuple(PLOT_FORMATS))
    settings = BenchSettings(
        batch_sizes=parse_list(batch_sizes, int), backends=parse_list(backends), methods=parse_list(methods),
        warmup=warmup, iters=iters, threads=threads, llm=llm, llm_shape=llm_shape, vqa_images=vqa_images,
        dynamic_tokens=new_tokens, device=str(devices.resolve_device(device)), dtype=dtypes.canonical(dtype),
        positions=check_positions(positions), model=model, full_hash=full_hash,
    )  # fmt: skip
    if not settings.batch_sizes or min(settings.batch_sizes) < 1:
        raise PrumergeError("batch sizes must be positive integers")
    if prompts is not None:
        settings.prompts = [p for p in _read_lines(prompts) if p.strip()] or settings.prompts
    console = out_console()
    from ..families.model import is_family_target
    from ..runtime.family_ort import is_family_export
    from ..runtime.ort import is_onnx_export

    for target in targets:
        if is_onnx_export(target) and is_family_export(target):
            raise PrumergeError(f"{target} is a family's tile graph: bench its bundle with --backends torch,ort, "
                                "which exports the graph of every variant itself")  # fmt: skip
    if is_family_target(targets[0]):
        bench_family(targets, images, synthetic, settings, json_path, plot, console)
        return
    pixels, source = load_pixels(targets[0], images, synthetic, model)
    with Phases(console) as phases:
        report = run_bench(targets, pixels, source, settings, phases)
    print_tables(report, console)
    if json_path is not None:
        write_json(report, json_path)
    if plot is not None:
        write_plot(report, plot)


def bench_family(targets: list[Path], images: Path | None, synthetic: int | None, settings: BenchSettings,
                 json_path: Path | None, plot: Path | None, console: Console) -> None:  # fmt: skip
    """The family bench: refuse what only LLaVA-1.5 checkpoints take, then measure and report."""
    from ..bench.family_bench import family_images, print_family_tables, run_family_bench
    from ..bench.report import write_json
    from ..bundle import is_bundle, read_bundle
    from ..models.loading import read_config

    if not set(settings.backends) <= {"torch", "ort"} or settings.llm is not None or plot is not None:
        raise PrumergeError("on a family checkpoint bench measures the encoder (torch, and ort for Gemma 3 and "
                            "InternVL) and the cost model's prefill: --backends trt, --llm and --plot take "
                            "LLaVA-1.5-shaped checkpoints")  # fmt: skip
    first = targets[0]
    family = read_bundle(first)["family"] if is_bundle(first) else read_config(first)["model_type"]
    groups = family_images(family, images, synthetic)
    with Phases(console) as phases:
        report = run_family_bench(targets, groups, settings, phases)
    print_family_tables(report, console)
    if json_path is not None:
        write_json(report, json_path)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PrumergeError(f"cannot read prompts {path}: {exc}") from None


def load_pixels(target: Path, images: Path | None, synthetic: int | None,
                model: Path | None = None) -> tuple[torch.Tensor, str]:  # fmt: skip
    """Preprocessed images from a directory, or held-out world images, with the processor of the target's model
    (`model` if given)."""
    if images is not None and synthetic is not None:
        raise PrumergeError("use either --images or --synthetic")
    synthetic = 8 if synthetic is None else synthetic
    from ..bench.variants import target_specs
    from ..models.images import collect_images, open_image, preprocess
    from ..models.loading import load_model

    processor = load_model(model or target_specs(target, ["none"])[0].model_dir).processor
    if images is not None:
        paths = collect_images([images])
        return preprocess(processor, [open_image(p) for p in paths]), f"{len(paths)} images from {images}"
    if synthetic < 1:
        raise PrumergeError("--synthetic needs at least 1 image")
    from ..zoo.world import samples_of

    samples = [s.image for s in samples_of("test", 0, synthetic)]
    return preprocess(processor, samples), f"{synthetic} held-out procedural-world images"
