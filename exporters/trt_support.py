"""What TensorRT export needs, checked up front so that a missing piece is one clear line."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from ..errors import PrumergeError

PLUGIN_MODES = ("jit", "aot", "none")  # TensorRT plugin implementation; none = the plugin-free graph
INSTALL_HINT = (
    'pip install "prumerge[trt]" with NVIDIA\'s package index as an extra index, on a machine with a CUDA GPU'
)


def require_tensorrt() -> ModuleType:
    """The `tensorrt` module, or a clean error naming what is missing (TensorRT, or a CUDA GPU)."""
    if importlib.util.find_spec("tensorrt") is None:
        raise PrumergeError(f"TensorRT is not installed: {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available():
        raise PrumergeError("TensorRT engines need a CUDA GPU and none is visible (torch.cuda.is_available() is False)")
    import tensorrt

    return tensorrt
