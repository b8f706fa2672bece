"""Where models run: `--device cpu | cuda | cuda:N`, checked up front, and an audit of the devices tensors are
created on (a torch function mode), so that a run on one device can be shown to create nothing elsewhere."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from .errors import PrumergeError

HELP = "cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """The device `name` names, refused in one line if it is malformed or not present."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise PrumergeError(f"unknown device {name!r}; choose {HELP}") from None
    if device.type not in ("cpu", "cuda"):
        raise PrumergeError(f"unsupported device {name!r}; choose {HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrumergeError(f"--device {name}: no CUDA device is visible (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PrumergeError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def finished(result: object, device: torch.device) -> object:
    """`result` once `device` has finished computing it (CUDA runs are asynchronous; CPU runs are not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (cpu for a module without parameters)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class DeviceAudit(TorchFunctionMode):
    """Records the device types of every tensor a torch function returns while it is active ("meta" tensors,
    which hold no data and which the ONNX exporter traces with, are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, tuple | list) else (result,):
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self.seen.add(value.device.type)
        return result
