"""A stand-in for TensorRT's compiled core (`tensorrt.so`): just enough of the `tensorrt` module for TensorRT's
own pure-Python plugin package (`tensorrt.plugin`, unpacked from the `tensorrt-cu12-bindings` wheel) to run on
a machine without TensorRT's libraries or a GPU.

`tests/trt_plugin_harness.py` installs this file as `tensorrt/__init__.py` beside the real `tensorrt/plugin/`
and plays TensorRT's part: the registry, plugin fields as the ONNX parser passes them, symbolic dimension
expressions (an `IExprBuilder` that folds constants and keeps symbols such as the batch size), format
combinations and the AOT launch-parameter setter. Expressions evaluate to integers for given symbol values.
"""

from __future__ import annotations

import enum
import operator
import os
from collections.abc import Callable, Iterable

import numpy as np

__version__ = os.environ.get("TRT_STANDIN_VERSION", "11.4.0")


class Logger:
    """TensorRT's logger: messages at WARNING and above go to stderr."""

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, severity: int = 2) -> None:
        self.severity = severity

    def log(self, severity: int, message: str) -> None:
        if severity <= self.severity:
            print(f"[tensorrt] {message}", file=__import__("sys").stderr)


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9


float32, float16, int8, int32, int64, bfloat16 = (DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32,
                                                   DataType.INT64, DataType.BF16)  # fmt: skip
_NUMPY_TYPES = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8,
                DataType.INT64: np.int64}  # fmt: skip


def nptype(dtype: DataType) -> type:
    """The NumPy type of a TensorRT data type."""
    return _NUMPY_TYPES[dtype]


class TensorFormat(enum.Enum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2


class PluginFieldType(enum.Enum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12


FIELD_NUMPY_TYPES = {PluginFieldType.FLOAT16: np.float16, PluginFieldType.FLOAT32: np.float32,
                     PluginFieldType.FLOAT64: np.float64, PluginFieldType.INT8: np.int8,
                     PluginFieldType.INT16: np.int16, PluginFieldType.INT32: np.int32,
                     PluginFieldType.INT64: np.int64, PluginFieldType.CHAR: np.int8,
                     PluginFieldType.UNKNOWN: np.int8}  # fmt: skip


class PluginField:
    """A named attribute buffer; like the bindings, `data` is always a NumPy array."""

    def __init__(self, name: str = "", data=None, type: PluginFieldType = PluginFieldType.UNKNOWN) -> None:
        self.name = name
        self.type = type
        if isinstance(data, bytes | bytearray):
            data = np.frombuffer(bytes(data), dtype=np.int8)
        self.data = np.asarray(data if data is not None else [], dtype=FIELD_NUMPY_TYPES.get(type))
        self.size = self.data.size


class PluginFieldCollection(list):
    """A list of PluginFields."""


class TensorRTPhase(enum.Enum):
    BUILD = 0
    RUNTIME = 1


class QuickPluginCreationRequest(enum.Enum):
    UNKNOWN = 0
    PREFER_JIT = 1
    PREFER_AOT = 2
    STRICT_JIT = 3
    STRICT_AOT = 4


class PluginArgType(enum.Enum):
    INT = 0


class PluginArgDataType(enum.Enum):
    INT8 = 0
    INT16 = 1
    INT32 = 2


class DimensionOperation(enum.Enum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8

    def __call__(self, a: int, b: int) -> int:
        return int(_OPERATIONS[self](a, b))


_OPERATIONS = {DimensionOperation.SUM: operator.add, DimensionOperation.PROD: operator.mul,
               DimensionOperation.MAX: max, DimensionOperation.MIN: min, DimensionOperation.SUB: operator.sub,
               DimensionOperation.EQUAL: operator.eq, DimensionOperation.LESS: operator.lt,
               DimensionOperation.FLOOR_DIV: operator.floordiv,
               DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b)}  # fmt: skip


class IDimensionExpr:
    """A dimension expression: a constant, a named symbol (a runtime dimension or a size tensor) or an operation."""

    def __init__(self, constant: int | None = None, symbol: str | None = None,
                 op: DimensionOperation | None = None, args: tuple = ()) -> None:  # fmt: skip
        self.constant, self.symbol, self.op, self.args = constant, symbol, op, args

    def is_constant(self) -> bool:
        return self.constant is not None

    def is_size_tensor(self) -> bool:
        return self.symbol is not None and self.symbol.startswith("size_tensor")

    def get_constant_value(self) -> int:
        if self.constant is None:
            raise RuntimeError("not a constant expression")
        return self.constant

    def evaluate(self, symbols: dict[str, int]) -> int:
        """The value of the expression for given symbol values."""
        if self.constant is not None:
            return self.constant
        if self.symbol is not None:
            return symbols[self.symbol]
        a, b = (arg.evaluate(symbols) for arg in self.args)
        return self.op(a, b)

    def __repr__(self) -> str:
        if self.constant is not None:
            return str(self.constant)
        if self.symbol is not None:
            return self.symbol
        return f"{self.op.name}({self.args[0]!r}, {self.args[1]!r})"


class IExprBuilder:
    """Builds dimension expressions; operations on two constants fold to a constant, as TensorRT's do."""

    def __init__(self) -> None:
        self.size_tensors: dict[int, tuple[IDimensionExpr, IDimensionExpr]] = {}

    def constant(self, value: int) -> IDimensionExpr:
        if not isinstance(value, int | np.integer):
            raise TypeError(f"IExprBuilder.constant takes an int, got {type(value).__name__}")
        return IDimensionExpr(constant=int(value))

    def operation(self, op: DimensionOperation, first: IDimensionExpr, second: IDimensionExpr) -> IDimensionExpr:
        if not (isinstance(first, IDimensionExpr) and isinstance(second, IDimensionExpr)):
            raise TypeError("IExprBuilder.operation takes two IDimensionExpr")
        if first.is_constant() and second.is_constant():
            return IDimensionExpr(constant=op(first.constant, second.constant))
        return IDimensionExpr(op=op, args=(first, second))

    def declare_size_tensor(self, index: int, opt: IDimensionExpr, upper: IDimensionExpr) -> IDimensionExpr:
        self.size_tensors[index] = (opt, upper)
        return IDimensionExpr(symbol=f"size_tensor{index}")


class Dims(tuple):
    """Concrete dimensions; `Dims(n)` has n zeros."""

    MAX_DIMS = 8

    def __new__(cls, shape: int | Iterable[int] = ()):
        return super().__new__(cls, [0] * shape if isinstance(shape, int) else shape)


class DimsExprs(list):
    """Dimension expressions of one tensor; `DimsExprs(n)` has n empty slots."""

    def __init__(self, items: int | Iterable[IDimensionExpr] = ()) -> None:
        super().__init__([None] * items if isinstance(items, int) else items)


class PluginTensorDesc:
    """Concrete type, format and dimensions of a plugin input or output."""

    def __init__(self, dims: Iterable[int] = (), type: DataType = DataType.FLOAT,
                 format: TensorFormat = TensorFormat.LINEAR, scale: float = 1.0) -> None:  # fmt: skip
        self.dims, self.type, self.format, self.scale = Dims(dims), type, format, scale


class DynamicPluginTensorDesc:
    """A PluginTensorDesc (-1 for runtime dimensions) with the profile's min / opt / max."""

    def __init__(self, desc: PluginTensorDesc, min: Iterable[int], opt: Iterable[int], max: Iterable[int]) -> None:
        self.desc, self.min, self.opt, self.max = desc, Dims(min), Dims(opt), Dims(max)


class ITensor:
    """A network tensor (only its type is used by the plugin package)."""


class ISymExpr:
    """A scalar argument of an AOT kernel: `type`, `dtype`, `expr`."""

    def __init__(self) -> None:
        self.type = self.dtype = self.expr = None


class SymExprSetter:
    """What `get_launch_params` fills with the kernel's scalar arguments."""

    def __init__(self) -> None:
        self.nbSymExprs = 0
        self.items: dict[int, ISymExpr] = {}

    def __setitem__(self, index: int, value: ISymExpr) -> None:
        if index >= self.nbSymExprs:
            raise IndexError("set nbSymExprs first")
        self.items[index] = value


class KernelLaunchParams:
    """Grid, block and shared memory of an AOT kernel, as expressions."""

    def __init__(self) -> None:
        one = IDimensionExpr(constant=1)
        self.grid_x = self.grid_y = self.grid_z = self.block_x = self.block_y = self.block_z = one
        self.shared_mem = IDimensionExpr(constant=0)


class _Interface:
    def __init__(self, *args, **kwargs) -> None:
        pass


class IPluginV3(_Interface):
    pass


class IPluginV3QuickCore(_Interface):
    pass


class IPluginV3QuickBuild(_Interface):
    pass


class IPluginV3QuickRuntime(_Interface):
    pass


class IPluginV3QuickAOTBuild(_Interface):
    pass


class IPluginCreatorV3Quick(_Interface):
    pass


class IPluginRegistry:
    """Creators by (name, version, namespace)."""

    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], IPluginCreatorV3Quick] = {}

    def register_creator(self, creator: IPluginCreatorV3Quick, namespace: str) -> bool:
        key = (creator.name, creator.plugin_version, namespace)
        if key in self.creators:
            raise RuntimeError(f"a creator for {namespace}::{creator.name} is already registered")
        self.creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = "") -> IPluginCreatorV3Quick | None:
        return self.creators.get((name, version, namespace))


_REGISTRY = IPluginRegistry()


def get_plugin_registry() -> IPluginRegistry:
    """The process's plugin registry."""
    return _REGISTRY


def unavailable(name: str) -> Callable:
    """What the stand-in does not provide (anything needing TensorRT's libraries or a GPU)."""

    def _raise(*args, **kwargs):
        raise RuntimeError(f"tensorrt.{name} needs TensorRT's libraries: not part of the stand-in")

    return _raise


Builder = Runtime = OnnxParser = unavailable("Builder")
