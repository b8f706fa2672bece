"""`prumerge export`: a bundle (or model) to an ONNX export directory, or to TensorRT engines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from .. import atomic, devices, dtypes
from ..errors import PrumergeError
from ..exporters.trt_support import PLUGIN_MODES
from ..progress import Phases
from . import app
from .console import out_console
from .options import PARAM_HELP, parse_params

if TYPE_CHECKING:  # loads transformers: imported where the command needs it
    from ..exporters.decode_export import DecodeOptions


def DECODE(**kwargs: object) -> typer.models.OptionInfo:
    """An option of the decode-step help panel."""
    return typer.Option(rich_help_panel="Decode step (predictor bundles)", **kwargs)


@app.command()
def export(
    target: Annotated[Path, typer.Argument(help="A bundle or a model directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Export directory to write.")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX (run by ONNX Runtime).")] = False,
    trt: Annotated[bool, typer.Option("--trt", help="Build TensorRT engines (needs TensorRT and a GPU).")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset, 18..23.")] = 18,
    dtype: Annotated[
        str | None, typer.Option(help="fp32 or fp16 for ONNX (default fp32); fp32, fp16 or bf16 for TensorRT (fp16).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="A fixed batch size (default: dynamic).")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Largest batch of a dynamic export (default 8).")] = None,
    with_projector: Annotated[bool, typer.Option(help="Append the LLaVA projector (outputs are LLM inputs).")] = False,
    check: Annotated[bool, typer.Option(help="Check ONNX Runtime against PyTorch.")] = True,
    plugins: Annotated[
        str,
        typer.Option(
            help="Custom nodes (prumerge::AdaptiveTokenSelect, or SparseKVAttention in a decode step) for TensorRT "
            "plugins: jit, aot (ahead-of-time kernels), or none (plugin-free graph). --plugins alone = jit."
        ),
    ] = "none",
    min_batch: Annotated[int, typer.Option(help="TensorRT profile: smallest batch.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile: batch to optimise for.")] = 1,
    timing_cache: Annotated[Path | None, typer.Option(help="TensorRT timing cache to read and update.")] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Override the bundle's method.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help=PARAM_HELP)] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing export directory.")] = False,
    model: Annotated[Path | None, typer.Option(help="Where a bundle's model is (default: as recorded).")] = None,
    full_hash: Annotated[bool, typer.Option(help="Check a bundle's model weights by their full hash.")] = False,
    device: Annotated[str, typer.Option(help=f"Where the model is traced and checked: {devices.HELP}.")] = "cpu",
    prompt_tokens: Annotated[int, DECODE(help="Prompt length (image included) the KV buffers hold.")] = 320,
    new_tokens: Annotated[int, DECODE(help="Generated tokens the KV buffers leave room for.")] = 64,
) -> None:
    """Export the vision encoder + reducer (+ projector) with static shapes, and check it.

    Gemma 3 and InternVL export a graph over a batch of tiles, each reduced alone on the LM's tokens.

    A predictor bundle (compress --method dynamic) exports its sparse-KV decode step instead: ONNX `Attention`
    over static KV buffers, or with [bold]--plugins[/bold] one prumerge::SparseKVAttention node per layer."""
    if onnx == trt:
        raise PrumergeError("choose one of --onnx or --trt")
    dtype = dtypes.canonical(
        dtype or ("fp16" if trt else "fp32"), ("fp32", "fp16", "bf16") if trt else ("fp32", "fp16")
    )
    if plugins not in PLUGIN_MODES:
        raise PrumergeError(f"--plugins takes {', '.join(PLUGIN_MODES)}, got {plugins!r}")
    if batch_size is not None and batch_size < 1:
        raise PrumergeError(f"--batch-size must be at least 1, got {batch_size}")
    if batch_size is not None and max_batch is not None:
        raise PrumergeError("--max-batch bounds a dynamic batch; --batch-size fixes it: give one of them")
    max_batch = 8 if max_batch is None else max_batch
    if max_batch < 1:
        raise PrumergeError(f"--max-batch must be at least 1, got {max_batch}")
    atomic.check_output(output, force)
    where = devices.resolve_device(device)
    console = out_console()
    from ..bundle import is_bundle
    from ..dynamic.bundle import is_dynamic
    from ..exporters.decode_export import DecodeOptions
    from ..families.model import is_family_target
    from ..targets import open_encoder

    family = is_family_target(target)
    if family and trt:
        raise PrumergeError(f"{target}: TensorRT export takes LLaVA-1.5-shaped checkpoints; a Gemma 3 or InternVL "
                            "one exports with --onnx")  # fmt: skip
    if is_bundle(target) and is_dynamic(target):
        options = DecodeOptions(batch_size or 1, prompt_tokens, new_tokens, plugins != "none", plugins == "aot", check)
        export_decode(target, output, options, trt, dtype, timing_cache, force, console, model, full_hash)
        return
    if trt:
        from ..exporters.trt_build import BatchProfile
        from ..exporters.trt_export import TrtOptions, export_trt
        from ..exporters.trt_support import require_tensorrt

        require_tensorrt()
        profile = BatchProfile(min_batch, opt_batch, max_batch)
        trt_options = TrtOptions(dtype, profile, timing_cache, plugins)
        encoder = open_encoder(target, method, parse_params(param), model, full_hash)
        with (
            Phases(console) as phases,
            phases.phase(f"building a TensorRT engine ({dtype}, plugins {trt_options.plugins})"),
        ):
            manifest = export_trt(encoder, output, trt_options, force=force)
        console.print(
            f"wrote {output}/model.plan for {manifest['gpu']['name']} (TensorRT {manifest['versions']['tensorrt']})"
        )
        return
    from ..exporters.onnx_export import OnnxOptions, export_onnx

    options = OnnxOptions(
        opset, dtype, batch_size, max_batch, with_projector, check, plugins != "none", plugins == "aot"
    )
    if family:
        from ..exporters.family_onnx import check_family_export, export_family_onnx
        from ..families.model import family_settings

        check_family_export(*family_settings(target), options)
    encoder = open_encoder(target, method, parse_params(param), model, full_hash).to(where)
    with Phases(console) as phases:
        if family:
            manifest = export_family_onnx(encoder, output, options, force=force, phases=phases)  # type: ignore[arg-type]
        else:
            manifest = export_onnx(encoder, output, options, force=force, phases=phases)
    print_manifest(console, output, manifest)


def print_manifest(console: Console, output: Path, manifest: dict) -> None:
    """Shapes, bound, parity and files of an export."""
    table = Table(title=f"ONNX export {output}", show_header=False)
    for spec in (*manifest["inputs"], *manifest["outputs"]):
        table.add_row(spec["name"], f"{spec['dtype']} {spec['shape']}")
    table.add_row("method", f"{manifest['method']} (Kmax {manifest['kmax']}: {manifest['kmax_rule']})")
    parity = manifest["parity"]
    if parity:
        table.add_row("parity", f"{'passed' if parity['passed'] else 'FAILED'}: indices equal "
                      f"{parity['indices_equal']}, tokens max abs {parity['tokens_max_abs']:.2e}")  # fmt: skip
    else:
        table.add_row("parity", "not checked (--no-check)")
    for plugin in manifest["plugins"]:
        table.add_row("plugin node", f"{plugin['domain']}::{plugin['op_type']} v{plugin['plugin_version']} "
                      f"(TensorRT plugin {plugin['tensorrt_plugin']}, {plugin['implementation']})")  # fmt: skip
    for name, info in manifest["files"].items():
        table.add_row(name, f"{info['bytes'] / 2**20:.1f} MiB")
    table.add_row("export time", f"{manifest['export_seconds']:.1f} s")
    console.print(table)


def export_decode(bundle: Path, output: Path, options: DecodeOptions, trt: bool, precision: str,
                  timing_cache: Path | None, force: bool, console: Console, model: Path | None = None,
                  full_hash: bool = False) -> None:  # fmt: skip
    """The decode step of a predictor bundle, to ONNX or to a TensorRT engine."""
    from ..dynamic.bundle import load_dynamic
    from ..exporters.decode_export import export_decode_step
    from ..zoo.world import samples_of

    if trt:
        from ..exporters.trt_support import require_tensorrt

        require_tensorrt()
    if options.batch < 1 or options.prompt_tokens < 2 or options.new_tokens < 1:
        raise PrumergeError("--batch-size, --prompt-tokens and --new-tokens must be positive")
    dynamic, encoder = load_dynamic(bundle, model_dir=model, full_hash=full_hash)
    if encoder.positions != "contiguous" and encoder.reducer.name != "none":
        raise PrumergeError(
            f"{bundle} places image tokens at their patches' positions; the exported decode step "
            "takes positions from its dense counter (contiguous), so it exports only such bundles"
        )
    image = encoder.encode_images([s.image for s in samples_of("test", 0, options.batch)], True)
    source = {"bundle": str(bundle.resolve()), "model": str(encoder.model_dir)}
    with Phases(console) as phases, phases.phase("exporting the sparse-KV decode step"):
        if trt:
            from ..exporters.trt_export import export_decode_trt

            manifest = export_decode_trt(dynamic, image, output, options, precision, timing_cache, force, source)
        else:
            manifest = export_decode_step(dynamic, image, output, options, force, source)
    table = Table(title=f"decode-step export {output}", show_header=False)
    table.add_row("attention", manifest["attention"] if "attention" in manifest else manifest["onnx"]["attention"])
    buffers = manifest.get("buffers") or manifest["onnx"]["buffers"]
    table.add_row("KV buffers", f"{buffers['dense_slots']} dense slots (layers < l), {buffers['sparse_slots']} sparse")
    for plugin in manifest["plugins"]:
        table.add_row("plugin nodes", f"{plugin['count']} x {plugin['domain']}::{plugin['op_type']} "
                      f"v{plugin['plugin_version']} ({plugin['implementation']})")  # fmt: skip
    parity = manifest.get("parity")
    table.add_row("parity", "not checked" if not parity else f"{'passed' if parity['passed'] else 'FAILED'}: "
                  f"{parity['steps']} steps, logits max rel {parity['logits_max_rel']:.1e}")  # fmt: skip
    console.print(table)
