"""`OrtEncoder`: run an ONNX export with ONNX Runtime and return `ReducedTokens`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import PrumergeError
from ..jsonfiles import read_json_object
from ..lm.positions import manifest_span
from ..models.images import preprocess
from ..reducers import ReducedTokens, Reducer, build_reducer

MANIFEST = "manifest.json"


def create_session(model_path: Path, threads: int | None, providers: list[Any] | None = None, plugins: bool = False):
    """An ONNX Runtime session with fixed threading (sequential execution, all graph optimisations).

    `plugins`: the graph has prumerge plugin nodes, run by onnxruntime-extensions with the reference."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise PrumergeError('ONNX Runtime is not installed: pip install "prumerge[onnx]"') from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not plugins:
        return _open(ort, model_path, options, providers, model_path)
    try:
        from ..plugins import attention_ops
        from ..plugins.onnx_ops import ort_model_with_pyops, register_ort_pyop
    except ImportError:
        raise PrumergeError('plugin graphs need onnxruntime-extensions: pip install "prumerge[dev]"') from None
    attention_ops.register_ort_pyop()
    options.register_custom_ops_library(register_ort_pyop())
    with tempfile.TemporaryDirectory(prefix="prumerge-pyops-") as tmp:  # the session holds the graph once created
        return _open(ort, ort_model_with_pyops(model_path, Path(tmp)), options, providers, model_path)


def _open(ort, path: Path, options, providers: list[Any] | None, shown: Path):
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid models
        raise PrumergeError(f"cannot load {shown}: {str(exc).splitlines()[0]}") from None


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The export's manifest, validated."""
    manifest = read_json_object(Path(out_dir) / MANIFEST, f"{out_dir} is not an ONNX export (no {MANIFEST})")
    if manifest.get("format") != "prumerge-onnx":
        raise PrumergeError(f"{Path(out_dir) / MANIFEST} is not a prumerge ONNX manifest")
    return manifest


def is_onnx_export(path: str | Path) -> bool:
    """Whether `path` looks like an export directory."""
    return (Path(path) / MANIFEST).is_file() and (Path(path) / "model.onnx").is_file()


class OrtEncoder:
    """Call on `pixel_values` (torch or numpy) to get `ReducedTokens`, trimmed to the batch's largest count."""

    def __init__(self, out_dir: str | Path, threads: int | None = None, providers: list[Any] | None = None):
        self.out_dir = Path(out_dir)
        self.manifest = read_manifest(self.out_dir)
        plugins = bool(self.manifest.get("plugins"))
        self.session = create_session(self.out_dir / "model.onnx", threads, providers, plugins)
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(str(self.out_dir), backend="pil")
        self.reducer: Reducer = build_reducer(self.manifest["method"], **self.manifest["params"])
        self.grid: tuple[int, int] = tuple(self.manifest["grid"])  # type: ignore[assignment]
        self.image_size: int = self.manifest["image_size"]
        self.fixed_batch: int | None = self.manifest["batch"].get("fixed")
        self.dtype = np.float16 if self.manifest["dtype"] == "fp16" else np.float32

    def __call__(self, pixel_values: torch.Tensor | np.ndarray) -> ReducedTokens:
        """Run the export; any batch size (fixed-batch exports run in padded chunks)."""
        pixels = np.asarray(pixel_values.numpy() if isinstance(pixel_values, torch.Tensor) else pixel_values)
        pixels = pixels.astype(self.dtype, copy=False)
        step = self.fixed_batch or self.manifest["batch"]["max"]
        parts = [self._run(pixels[i : i + step]) for i in range(0, len(pixels), step)]
        tokens, lengths, indices = (np.concatenate(p) for p in zip(*parts, strict=True))
        width = int(lengths.max())
        return ReducedTokens(
            torch.from_numpy(tokens[:, :width]),
            torch.from_numpy(lengths),
            torch.from_numpy(indices[:, :width]),
            span=manifest_span(self.manifest),
        )

    def _run(self, chunk: np.ndarray) -> list[np.ndarray]:
        count = len(chunk)
        if self.fixed_batch and count < self.fixed_batch:
            chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - count, *chunk.shape[1:]), chunk.dtype)])
        outputs = self.session.run(["tokens", "lengths", "indices"], {"pixel_values": chunk})
        return [o[:count] for o in outputs]

    def encode_images(self, images: list[Image.Image]) -> ReducedTokens:
        """Preprocess PIL images with the exported checkpoint's processor, then run."""
        return self(preprocess(self.processor, images))
