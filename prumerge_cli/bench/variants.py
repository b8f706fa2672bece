"""Turn bench targets (model directories, bundles, ONNX exports) into runnable variants of one model,
always including that model's unreduced baseline on every backend."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bundle import is_bundle, read_bundle
from ..encoder import ReducedVisionEncoder
from ..errors import PrumergeError
from ..exporters.onnx_export import OnnxOptions, export_onnx
from ..finetune.bundle import load_projector, regime
from ..lm.positions import DEFAULT_POSITIONS
from ..model_ref import resolve_model, verify_weights
from ..models.loading import load_model
from ..models.weights import weight_files
from ..reducers import ReducedTokens, build_reducer
from ..runtime.ort import OrtEncoder, is_onnx_export, read_manifest

BACKENDS = ("torch", "ort", "trt")


@dataclass
class Variant:
    """One method on one backend; `run` maps pixel values to LLM-ready (projected, if possible) tokens."""

    method: str
    params: dict[str, Any]
    backend: str
    run: Callable[[torch.Tensor], ReducedTokens]
    baseline: bool = False
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    regime: str = "training-free"
    positions: str = DEFAULT_POSITIONS
    label: str = field(init=False)

    def __post_init__(self) -> None:
        extra = "".join(f" {k}={v}" for k, v in self.params.items() if k in ("budget", "side") and v is not None)
        self.label = f"{self.method}{extra}" + (" fine-tuned" if self.regime == "fine-tuned" else "")
        if self.positions != DEFAULT_POSITIONS and self.method != "none":  # every token: the same either way
            self.label += f" ({self.positions} positions)"


@dataclass
class Spec:
    """What a target asks for: the model, the method and its parameters."""

    model_dir: Path
    method: str
    params: dict[str, Any]
    source: str = ""  # the bundle or export it came from
    regime: str = "training-free"  # or "fine-tuned": the LLaVA was fine-tuned with this reducer active
    positions: str = DEFAULT_POSITIONS


def target_specs(target: Path, methods: list[str], positions: str = DEFAULT_POSITIONS,
                 model_dir: Path | None = None, full_hash: bool = False) -> list[Spec]:  # fmt: skip
    """A bundle or export names one method and its positions; a model directory takes `methods` at `positions`.
    A bundle's model is `model_dir` if given, else where it records, its weights checked as `bundle.load` does."""
    if is_bundle(target):
        record = read_bundle(target)
        model = resolve_model(record["model"], target, model_dir).resolve()
        verify_weights(record["model"], model, weight_files(model), full_hash)
        where = record.get("positions", "contiguous")
        return [Spec(model, record["method"], record["params"], str(target), regime(record), where)]
    if is_onnx_export(target):
        manifest = read_manifest(target)
        return [Spec(Path(manifest["source"]["model"]), manifest["method"], manifest["params"], str(target),
                     positions=manifest.get("positions", "contiguous"))]  # fmt: skip
    if (target / "config.json").is_file():
        return [Spec(target.resolve(), m, {}, positions=positions) for m in methods]
    raise PrumergeError(f"{target} is not a model directory, a bundle or an ONNX export")


def build_variants(
    targets: list[Path],
    methods: list[str],
    backends: list[str],
    max_batch: int,
    workdir: Path,
    threads: int | None,
    device: torch.device,
    dtype: str = "fp32",
    positions: str = DEFAULT_POSITIONS,
    model_dir: Path | None = None,
    full_hash: bool = False,
    advance: Callable[[], None] = lambda: None,
) -> tuple[ReducedVisionEncoder, list[Variant]]:
    """The baseline and every target's variant on every backend (torch on `device`, ONNX Runtime on the CPU,
    TensorRT on the GPU); ONNX exports are made in `workdir`; bundles' models as `target_specs` finds them.
    `advance` is called as each variant is ready."""
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise PrumergeError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    if dtype == "bf16" and set(backends) - {"torch"}:
        raise PrumergeError("bf16 runs on the torch backend only (ONNX Runtime and TensorRT exports are fp32 or fp16)")
    if "trt" in backends:
        from ..exporters.trt_support import require_tensorrt

        require_tensorrt()
    specs = [s for t in targets for s in target_specs(Path(t), methods, positions, model_dir, full_hash)]
    models = {s.model_dir.resolve() for s in specs}
    if len(models) != 1:
        raise PrumergeError(f"bench compares variants of one model; the targets use {len(models)}")
    the_model = models.pop()
    specs = [Spec(the_model, "none", {}, positions=positions), *(s for s in specs if s.method != "none")]
    model = load_model(the_model, dtype)  # one copy of the weights, shared by every variant (exported on the CPU)
    variants = []
    baseline_encoder = None
    for i, spec in enumerate(specs):
        reducer = build_reducer(spec.method, **spec.params)
        encoder = ReducedVisionEncoder(model, reducer, the_model, positions=spec.positions)
        baseline_encoder = baseline_encoder or encoder
        if spec.regime == "fine-tuned":  # its own trained projector, beside the shared tower
            encoder.projector = copy.deepcopy(model.projector)
            load_projector(Path(spec.source), encoder.projector)
        for backend in backends:
            where = torch.device("cpu")
            if backend == "torch":
                run, where = _torch_runner(encoder), device
            elif backend == "trt":
                from ..exporters.trt_build import BatchProfile
                from ..exporters.trt_export import TrtOptions, export_trt
                from ..runtime.trt import TrtEncoder

                out = workdir / f"{i}-{spec.method}-trt"
                export_trt(encoder, out, TrtOptions(profile=BatchProfile(1, max_batch, max_batch)))
                run, where = TrtEncoder(out), torch.device("cuda")
            else:
                out = workdir / f"{i}-{spec.method}"
                options = OnnxOptions(dtype=dtype, max_batch=max_batch, with_projector=encoder.projector is not None,
                                      check=False)  # fmt: skip
                export_onnx(encoder, out, options)
                run = OrtEncoder(out, threads=threads)
            variants.append(Variant(spec.method, encoder.reducer.params(), backend, run, i == 0, spec.source, where,
                                    spec.regime, spec.positions))  # fmt: skip
            advance()
    assert baseline_encoder is not None
    model.vision.to(device)  # every export is made: the shared weights go where the torch variants run
    if model.projector is not None:
        model.projector.to(device)
    name_sources(variants)
    return baseline_encoder, variants


def name_sources(variants: list[Variant]) -> None:
    """Where targets give the same label (a bundle and its own export), add the target to each label."""
    sources: dict[str, set[str]] = {}
    for v in variants:
        sources.setdefault(v.label, set()).add(v.source)
    for v in variants:
        if len(sources[v.label]) > 1 and v.source:
            v.label = f"{v.label} from {v.source}"


def _torch_runner(encoder: ReducedVisionEncoder) -> Callable[[torch.Tensor], ReducedTokens]:
    def run(pixels: torch.Tensor) -> ReducedTokens:
        return encoder(pixels, project=True)

    return run
