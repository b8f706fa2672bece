"""`TrtEncoder`: run a `prumerge export --trt` engine on CUDA tensors and return `ReducedTokens`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import PrumergeError
from ..jsonfiles import read_json_object
from ..lm.positions import manifest_span
from ..reducers import ReducedTokens

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                "INT32": torch.int32}  # fmt: skip


def output_allocator(trt):
    """A `trt.IOutputAllocator` for outputs whose shape is known only after execution (a plugin's size
    tensor): TensorRT asks for bytes (torch CUDA buffers) and reports the final shape."""

    class DeviceOutputAllocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, torch.Tensor] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int:
            buffer = self.buffers.get(tensor_name)
            if buffer is None or buffer.numel() < size:
                buffer = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
                self.buffers[tensor_name] = buffer
            return buffer.data_ptr()

        def notify_shape(self, tensor_name: str, shape) -> None:
            self.shapes[tensor_name] = tuple(shape)

        def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
            """The output as a typed tensor of its final shape."""
            shape = self.shapes[name]
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            return self.buffers[name][:nbytes].view(dtype).view(shape)

    return DeviceOutputAllocator()


class TrtEncoder:
    """Device tensors in and out. The padded outputs have static shapes; outputs whose shape depends on the
    data (a size-tensor plugin) go through an output allocator."""

    def __init__(self, out_dir: str | Path):
        from ..exporters.trt_support import require_tensorrt

        trt = require_tensorrt()
        self.out_dir = Path(out_dir)
        self.manifest = read_json_object(self.out_dir / "manifest.json", f"{out_dir} is not a TensorRT export")
        if self.manifest.get("format") != "prumerge-trt":
            raise PrumergeError(f"{out_dir}/manifest.json is not a prumerge TensorRT manifest")
        if self.manifest["plugins"]:
            from ..plugins.trt_plugins import register_plugins

            register_plugins()  # JIT plugins must be registered before the engine is deserialized
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine((self.out_dir / "model.plan").read_bytes())
        if self.engine is None:
            raise PrumergeError(f"cannot deserialize {self.out_dir / 'model.plan'} (TensorRT version or GPU differ?)")
        self.context = self.engine.create_execution_context()
        self.allocator = output_allocator(trt)

    def __call__(self, pixel_values: torch.Tensor) -> ReducedTokens:
        """Run on one batch (within the engine's profile)."""
        stream = torch.cuda.current_stream()
        dtype = TORCH_DTYPES[self.engine.get_tensor_dtype("pixel_values").name]
        pixels = pixel_values.to("cuda", dtype).contiguous()
        self.context.set_input_shape("pixel_values", tuple(pixels.shape))
        self.context.set_tensor_address("pixel_values", pixels.data_ptr())
        outputs, dynamic = {}, {}
        for name in ("tokens", "lengths", "indices"):
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            if min(shape, default=0) < 0:
                dynamic[name] = dtype
                self.context.set_output_allocator(name, self.allocator)
            else:
                outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
                self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise PrumergeError("TensorRT execution failed")
        stream.synchronize()
        outputs.update({name: self.allocator.tensor(name, dtype) for name, dtype in dynamic.items()})
        width = int(outputs["lengths"].max())
        return ReducedTokens(outputs["tokens"][:, :width], outputs["lengths"], outputs["indices"][:, :width],
                             span=manifest_span(self.manifest))  # fmt: skip
