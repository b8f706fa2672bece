"""What TensorRT export needs, checked up front so that a missing piece is one clear line."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from ..errors import PrumergeError

PLUGIN_MODES = ("jit", "aot", "none")  # TensorRT plugin implementation; none = the plugin-free graph
SUPPORTED_TENSORRT = ((10, 9), (12, 0))  # [10.9, 12): the AOT plugin API (aot_impl, KernelLaunchParams) is 10.9+
SUPPORTED_TENSORRT_TEXT = "TensorRT >= 10.9, < 12"
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

    check_tensorrt_version(tensorrt.__version__)
    return tensorrt


def check_tensorrt_version(version: str) -> None:
    """Refuse, in one line naming `version`, a TensorRT outside the supported range."""
    try:
        installed = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        raise PrumergeError(
            f"cannot read the TensorRT version {version!r}; prumerge needs {SUPPORTED_TENSORRT_TEXT}"
        ) from None
    low, high = SUPPORTED_TENSORRT
    if not low <= installed < high:
        raise PrumergeError(f"TensorRT {version} is installed; prumerge's plugins need {SUPPORTED_TENSORRT_TEXT}")
