"""Export a `ReducedVisionEncoder` (tower + reducer, optionally + projector) to ONNX with static shapes,
check it against PyTorch with ONNX Runtime, and write the export directory atomically."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from .. import atomic
from ..devices import module_device
from ..encoder import ReducedVisionEncoder, project_tokens
from ..errors import PrumergeError
from ..models.tower import ScoreDtype
from ..models.weights import hash_files
from ..progress import Phases, phase_of
from ..reducers import Reducer, TowerSignals
from ..versions import package_versions

MANIFEST = "manifest.json"
FORMAT = "prumerge-onnx"
OPSETS = range(18, 24)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
OUTPUTS = ("tokens", "lengths", "indices")
SAMPLE_BATCH = 2


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's warnings and info logging (missing torchvision ops, deprecations, the graph
    optimiser's notes on initializers it leaves alone)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def exporting() -> Iterator[None]:
    """A quiet exporter whose failures become one clean error line (PRUMERGE_DEBUG=1 shows the traceback)."""
    try:
        with quiet_exporter():
            yield
    except Exception as exc:
        if os.environ.get("PRUMERGE_DEBUG"):
            raise
        raise PrumergeError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


class ExportModule(nn.Module):
    """pixel_values [B, 3, H, W] -> tokens [B, Kmax, C], lengths [B], indices [B, Kmax]; no host reads."""

    def __init__(
        self, encoder: ReducedVisionEncoder, with_projector: bool, score_dtype: ScoreDtype, plugins: bool = False
    ):
        super().__init__()
        self.tower = encoder.tower
        self.reducer = encoder.reducer.for_export(encoder.tower.num_patches)
        self.projector = encoder.projector if with_projector else None
        self.score_dtype: ScoreDtype = score_dtype
        self.plugins = plugins

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        signals = self.tower(pixel_values, with_scores=self.reducer.needs_scores, score_dtype=self.score_dtype)
        if self.score_dtype == "float32":
            scores, keys = (None if t is None else t.float() for t in (signals.scores, signals.keys))
            signals = TowerSignals(signals.features.float(), scores, keys, signals.grid)
        if self.plugins:
            p = self.reducer
            tokens, lengths, indices = torch.ops.prumerge.adaptive_token_select(
                signals.features, signals.scores, signals.keys, int(p.name == "prumerge+"), p.iqr_k, p.knn,
                getattr(p, "grid_div", 3),
            )  # fmt: skip
        else:
            out = self.reducer.reduce(signals)
            tokens, lengths, indices = out.tokens, out.lengths, out.indices
        tokens = tokens.to(pixel_values.dtype)
        if self.projector is not None:
            tokens = project_tokens(self.projector, tokens, lengths)
        return tokens, lengths, indices


@dataclass(frozen=True)
class OnnxOptions:
    """What to export: opset, dtype, a fixed batch or a dynamic one up to `max_batch`, the projector."""

    opset: int = 18
    dtype: str = "fp32"
    batch: int | None = None
    max_batch: int = 8
    with_projector: bool = False
    check: bool = True
    plugins: bool = False
    aot: bool = False  # with plugins: ask TensorRT for the ahead-of-time implementation

    def __post_init__(self) -> None:
        if self.batch is None and self.max_batch == 1:  # a dynamic batch of at most one is the fixed batch 1
            object.__setattr__(self, "batch", 1)

    def validate(self, encoder: ReducedVisionEncoder) -> None:
        """Clean errors for options this exporter cannot honour."""
        if self.opset not in OPSETS:
            raise PrumergeError(f"unsupported opset {self.opset}; choose {OPSETS.start}..{OPSETS.stop - 1}")
        if self.dtype not in DTYPES:
            raise PrumergeError(f"unsupported dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if (self.batch is not None and self.batch < 1) or self.max_batch < 1:
            raise PrumergeError("batch sizes must be >= 1")
        if self.with_projector and encoder.projector is None:
            raise PrumergeError("--with-projector needs a LLaVA checkpoint; this model has no projector")
        if self.plugins:
            r = encoder.reducer
            plain = (
                getattr(r, "merge", False) and getattr(r, "order", "") == "official" and getattr(r, "cap", 0) is None
            )
            if r.name not in ("prumerge", "prumerge+") or not plain or getattr(r, "grid_end", None) is not None:
                raise PrumergeError("--plugins covers prumerge and prumerge+ with merge on, official order and no cap")


def sample_pixels(batch: int, side: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic sample inputs: smooth random images, normalised like CLIP inputs."""
    gen = torch.Generator().manual_seed(0)
    low = torch.rand(batch, 3, 8, 8, generator=gen)
    image = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    noise = 0.1 * torch.randn(batch, 3, side, side, generator=gen)
    return ((image + noise - 0.45) / 0.27).to(dtype)


def export_onnx(
    encoder: ReducedVisionEncoder,
    out_dir: Path,
    options: OnnxOptions,
    force: bool = False,
    phases: Phases | None = None,
) -> dict[str, Any]:
    """Export, check parity (unless disabled) and write `out_dir`, each step shown by `phases`; returns the
    manifest."""
    options.validate(encoder)
    dtype = DTYPES[options.dtype]
    # Runtimes round fp16 differently, and selection and merging amplify that (close scores swap, sums of
    # hundreds of small terms drift): half-precision exports run the tower in fp16 but score, select and
    # merge in fp32, which costs little and makes results reproducible across runtimes.
    score_dtype: ScoreDtype = "float32" if options.dtype == "fp16" else encoder.score_dtype
    module = ExportModule(encoder, options.with_projector, score_dtype, options.plugins)
    if next(module.parameters()).dtype != dtype:  # cast a copy: the caller's encoder keeps its own dtype
        module = copy.deepcopy(module)
    module = module.to(dtype).eval()
    sample = sample_pixels(options.batch or SAMPLE_BATCH, encoder.image_size, dtype).to(module_device(encoder))
    width = (encoder.projector.linear_2.out_features if module.projector is not None
             else encoder.tower.vision.config.hidden_size)  # fmt: skip
    facts = GraphFacts(
        encoder.image_size, encoder.tower.num_patches, encoder.grid, width, encoder.positions,
        encoder.reducer.params(), module.projector is not None, score_dtype,
        "float32" if score_dtype == "float32" else options.dtype,
        {"model": str(encoder.model_dir), "model_type": encoder.model.model_type},
    )  # fmt: skip
    return write_export(module, sample, options, facts, encoder.processor, out_dir, force, phases)


@dataclass(frozen=True)
class GraphFacts:
    """What the manifest says of an exported graph beside the options: its input side, the patches (or tiles'
    tokens) it reduces on their grid, the width of its tokens, and where they come from."""

    image_size: int
    num_patches: int
    grid: tuple[int, int]
    width: int
    positions: str
    params: dict[str, Any]
    with_projector: bool
    score_dtype: str
    merge_dtype: str
    source: dict[str, Any]
    batch_name: str = "batch"
    """What the first dimension counts: images, or a family's tiles."""


def write_export(module: nn.Module, sample: torch.Tensor, options: OnnxOptions, facts: GraphFacts, processor: Any,
                 out_dir: Path, force: bool, phases: Phases | None) -> dict[str, Any]:  # fmt: skip
    """Trace `module` (pixel_values -> tokens, lengths, indices) on `sample` to ONNX, check ONNX Runtime against
    it unless `options.check` is off, and write `out_dir` (the graph, the image processor, the manifest)."""
    table = None
    if options.plugins:
        from ..plugins.onnx_ops import translation_table

        table = translation_table(options.aot)
    dynamic = None
    if options.batch is None:
        dynamic = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=max(2, options.max_batch))}}
    name = module.reducer.name
    with atomic.atomic_dir(out_dir, force=force) as tmp:
        start = time.perf_counter()
        with phase_of(phases, f"exporting {name} to ONNX (opset {options.opset}, {options.dtype})"):
            with exporting():
                program = torch.onnx.export(
                    module, (sample,), dynamo=True, opset_version=options.opset, input_names=["pixel_values"],
                    output_names=list(OUTPUTS), dynamic_shapes=dynamic, verbose=False, custom_translation_table=table,
                )  # fmt: skip
            program.save(str(tmp / "model.onnx"))
        export_seconds = time.perf_counter() - start
        processor.save_pretrained(tmp)
        if options.plugins:
            onnx.checker.check_model(str(tmp / "model.onnx"))
        parity = None
        if options.check:
            with phase_of(phases, "checking ONNX Runtime against PyTorch"):
                parity = check_parity(module, tmp / "model.onnx", sample, options)
        manifest = build_manifest(facts, module.reducer, options, tmp, export_seconds, parity)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_parity(module: nn.Module, model_path: Path, sample: torch.Tensor, options: OnnxOptions) -> dict[str, Any]:
    """ONNX Runtime (CPU) against PyTorch on the sample.

    fp32: lengths and indices equal, tokens within 1e-4 max abs (times the largest token magnitude where
    that exceeds 1, since summation order differs between runtimes). fp16: the two runtimes round differently
    (ORT runs several fp16 ops in fp32), so patches with close scores may swap places or, at the fence,
    change sides; lengths must be equal, at least 90% of the kept patches must agree, and tokens matched by
    patch index must agree within 3e-2 relative (of the largest token magnitude): ONNX Runtime 1.32 on a Xeon
    with AVX512-FP16 gives 1.7% on the test tower, where 1.31 on an EPYC stayed under 1%.
    """
    from ..runtime.ort import create_session

    dtype = options.dtype
    session = create_session(model_path, threads=None, plugins=options.plugins)
    got = session.run(list(OUTPUTS), {"pixel_values": sample.cpu().numpy()})
    with torch.no_grad():
        want = [t.cpu().numpy() for t in module(sample)]
    if not np.isfinite(want[0]).all():
        raise PrumergeError("the model gives NaN or Inf features on the check images; check its weights")
    scale = float(np.abs(want[0]).max()) or 1.0
    agree, worst = [], 0.0
    for b, n in enumerate(want[1]):
        slot_of = {int(p): i for i, p in enumerate(got[2][b, :n])}
        shared = [(slot_of[int(p)], i) for i, p in enumerate(want[2][b, :n]) if int(p) in slot_of]
        agree.append(len(shared) / max(1, int(n)))
        for g, w in shared:
            worst = max(worst, float(np.abs(got[0][b, g].astype(np.float32) - want[0][b, w].astype(np.float32)).max()))
    report = {
        "samples": int(sample.shape[0]),
        "lengths_equal": bool(np.array_equal(got[1], want[1])),
        "indices_equal": bool(np.array_equal(got[2], want[2])),
        "kept_agreement": min(agree),
        "tokens_max_abs": worst,
        "tokens_max_rel": worst / scale,
    }
    if dtype == "fp32":
        report["tolerance"] = "indices equal, tokens max abs 1e-4 x max(1, largest magnitude)"
        close = report["indices_equal"] and worst <= 1e-4 * max(1.0, scale)
    else:
        report["tolerance"] = ">= 90% kept patches agree, matched tokens max rel 3e-2"
        close = report["kept_agreement"] >= 0.9 and report["tokens_max_rel"] <= 3e-2
    report["passed"] = report["lengths_equal"] and close
    if not report["passed"]:
        raise PrumergeError(f"ONNX Runtime disagrees with PyTorch: {json.dumps(report)} (--no-check skips this)")
    return report


def plugin_records(aot: bool) -> list[dict[str, str]]:
    """How a reader (or TensorRT's ONNX parser) recognises the custom nodes of a plugin graph."""
    from ..plugins.onnx_ops import DOMAIN, OP_TYPE, VERSION

    return [{
        "op_type": OP_TYPE, "domain": DOMAIN, "plugin_namespace": DOMAIN, "plugin_version": VERSION,
        "tensorrt_plugin": f"{DOMAIN}::{OP_TYPE}", "implementation": "aot" if aot else "jit",
        "onnxruntime": "onnxruntime-extensions Python op (reference)",
    }]  # fmt: skip


def build_manifest(
    facts: GraphFacts,
    reducer: Reducer,
    options: OnnxOptions,
    out_dir: Path,
    export_seconds: float,
    parity: dict[str, Any] | None,
) -> dict[str, Any]:
    """Everything a runtime or a reader needs to know about the export."""
    kmax = reducer.max_tokens(facts.num_patches)
    batch: Any = options.batch if options.batch is not None else facts.batch_name
    files = sorted(p for p in out_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    return {
        "format": FORMAT,
        "format_version": 1,
        "versions": package_versions("onnx", "onnxruntime", "onnxscript"),
        "opset": options.opset,
        "dtype": options.dtype,
        "batch": {"fixed": options.batch} if options.batch else {"min": 1, "max": max(2, options.max_batch)},
        "inputs": [
            {"name": "pixel_values", "shape": [batch, 3, facts.image_size, facts.image_size], "dtype": options.dtype}
        ],
        "outputs": [
            {"name": "tokens", "shape": [batch, kmax, facts.width], "dtype": options.dtype},
            {"name": "lengths", "shape": [batch], "dtype": "int64"},
            {"name": "indices", "shape": [batch, kmax], "dtype": "int64", "extra_token": -1, "padding": -2},
        ],
        "method": reducer.name,
        "score_dtype": facts.score_dtype,
        "merge_dtype": facts.merge_dtype,
        "params": facts.params,
        "kmax": kmax,
        "kmax_rule": reducer.bound_rule,
        "num_patches": facts.num_patches,
        "positions": facts.positions,
        "grid": list(facts.grid),
        "image_size": facts.image_size,
        "with_projector": facts.with_projector,
        "plugins": plugin_records(options.aot) if options.plugins else [],
        "source": facts.source,
        "export_seconds": round(export_seconds, 2),
        "parity": parity,
        "files": {p.name: {"sha256": hash_files([p]), "bytes": p.stat().st_size} for p in files},
    }
