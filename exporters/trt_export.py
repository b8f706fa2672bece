"""`prumerge export --trt`: an ONNX export built into a TensorRT engine, with its timing cache and manifest.

TensorRT 10.x is weakly typed (fp16/bf16 are builder flags over an fp32 graph); 11.x is strongly typed
(precision comes from the ONNX dtypes, so fp16 engines are built from an fp16 export)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import atomic
from ..encoder import ReducedVisionEncoder
from ..errors import PrumergeError
from ..versions import package_versions
from .onnx_export import OnnxOptions, export_onnx
from .trt_build import BatchProfile, build_engine
from .trt_support import PLUGIN_MODES, require_tensorrt

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TrtOptions:
    """Precision, batch profile, timing cache to start from, plugin implementation kind."""

    precision: str = "fp16"
    profile: BatchProfile = field(default_factory=BatchProfile)
    timing_cache: Path | None = None
    plugins: str = "none"


def export_trt(
    encoder: ReducedVisionEncoder, out_dir: Path, options: TrtOptions, force: bool = False
) -> dict[str, Any]:
    """Build `out_dir/{model.plan, timing.cache, manifest.json, onnx/}`; returns the manifest."""
    if options.precision not in PRECISIONS:
        raise PrumergeError(f"unsupported precision {options.precision!r}; choose from {', '.join(PRECISIONS)}")
    if options.plugins not in PLUGIN_MODES:
        raise PrumergeError(f"--plugins takes {', '.join(PLUGIN_MODES)}")
    trt = require_tensorrt()
    strongly_typed = not hasattr(trt.BuilderFlag, "FP16")
    onnx_dtype, flags = "fp32", ()
    if options.precision != "fp32":
        if strongly_typed and options.precision == "bf16":
            raise PrumergeError("TensorRT 11 takes precision from the ONNX dtypes and bf16 exports are not supported")
        if strongly_typed:
            onnx_dtype = "fp16"
        else:
            flags = (options.precision.upper(),)
    if options.plugins != "none":
        from ..plugins.trt_plugins import register_plugins

        register_plugins()
    cache = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else None
    with atomic.atomic_dir(out_dir, force=force) as tmp:
        onnx_options = OnnxOptions(dtype=onnx_dtype, max_batch=options.profile.max, check=False,
                                   plugins=options.plugins != "none", aot=options.plugins == "aot")  # fmt: skip
        onnx_manifest = export_onnx(encoder, tmp / "onnx", onnx_options)
        plan, timing = build_engine(trt, tmp / "onnx" / "model.onnx", encoder.image_size, options.profile, cache, flags)
        (tmp / "model.plan").write_bytes(plan)
        (tmp / "timing.cache").write_bytes(timing)
        manifest = trt_manifest(trt, options, onnx_manifest, strongly_typed)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if options.timing_cache is not None:
        atomic.write_bytes(options.timing_cache, timing)
    return manifest


def trt_manifest(trt, options: TrtOptions, onnx_manifest: dict[str, Any], strongly_typed: bool) -> dict[str, Any]:
    """Versions, GPU, profile, plugins and precision of an engine."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    p = options.profile
    return {
        "format": "prumerge-trt", "format_version": 1,
        "versions": {**package_versions("onnx"), "tensorrt": trt.__version__},
        "gpu": {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"},
        "precision": options.precision, "strongly_typed": strongly_typed,
        "profile": {"pixel_values": {"min": p.min, "opt": p.opt, "max": p.max}},
        "plugins": onnx_manifest["plugins"],
        "onnx": onnx_manifest,
    }  # fmt: skip


def export_decode_trt(dynamic, image, out_dir: Path, options, precision: str, timing_cache: Path | None,
                      force: bool, source: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Build the sparse-KV decode step (static shapes) into `out_dir/{model.plan, timing.cache, manifest.json,
    onnx/}`; plugins as `options` asks (none, JIT or AOT SparseKVAttention)."""
    from .decode_export import export_decode_step

    if precision not in PRECISIONS:
        raise PrumergeError(f"unsupported precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    trt = require_tensorrt()
    strongly_typed = not hasattr(trt.BuilderFlag, "FP16")
    flags = () if strongly_typed or precision == "fp32" else (precision.upper(),)
    if options.plugins:
        from ..plugins.trt_plugins import register_plugins

        register_plugins()
    cache = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else None
    with atomic.atomic_dir(out_dir, force=force) as tmp:
        onnx_manifest = export_decode_step(dynamic, image, tmp / "onnx", options, source=source)
        plan, timing = build_engine(trt, tmp / "onnx" / "model.onnx", None, None, cache, flags)
        (tmp / "model.plan").write_bytes(plan)
        (tmp / "timing.cache").write_bytes(timing)
        kind = "aot" if options.aot else "jit" if options.plugins else "none"
        manifest = trt_manifest(trt, TrtOptions(precision, BatchProfile(options.batch, options.batch, options.batch),
                                                timing_cache, kind), onnx_manifest, strongly_typed)  # fmt: skip
        manifest["profile"] = "static shapes: see onnx.inputs"
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if timing_cache is not None:
        atomic.write_bytes(timing_cache, timing)
    return manifest
