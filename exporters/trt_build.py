"""Build a serialized TensorRT engine from an ONNX export. Works with `tensorrt` (10.x, 11.x) and with
`tensorrt_rtx`, whose builder API is the same and which builds engines without a GPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import PrumergeError


@dataclass(frozen=True)
class BatchProfile:
    """Min / opt / max batch of the optimisation profile."""

    min: int = 1
    opt: int = 1
    max: int = 8


def build_engine(
    trt: ModuleType,
    onnx_path: Path,
    image_size: int | None,
    profile: BatchProfile | None,
    timing_cache: bytes | None = None,
    flags: tuple[str, ...] = (),
) -> tuple[bytes, bytes]:
    """Parse `onnx_path` and build it with builder `flags` (e.g. "FP16" on TensorRT 10); returns
    (serialized engine, timing cache). `profile` sets the batch range of the `pixel_values` input of an encoder;
    None builds a graph with static shapes (the decode step)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PrumergeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if profile is not None:
        shapes = [(b, 3, image_size, image_size) for b in (profile.min, profile.opt, profile.max)]
        optimisation = builder.create_optimization_profile()
        optimisation.set_shape(network.get_input(0).name, *shapes)
        config.add_optimization_profile(optimisation)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PrumergeError(f"TensorRT could not build an engine from {onnx_path} (see the log above)")
    return bytes(plan), bytes(cache.serialize())
