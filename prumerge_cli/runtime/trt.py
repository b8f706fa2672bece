"""`TrtEncoder`: run a `prumerge export --trt` engine on CUDA tensors and return `ReducedTokens`."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PrumergeError
from ..jsonfiles import read_json_object
from ..reducers import ReducedTokens

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                "INT32": torch.int32}  # fmt: skip


class TrtEncoder:
    """Device tensors in and out; the padded outputs have static shapes, so no output allocator is needed."""

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
        self.trt = trt

    def __call__(self, pixel_values: torch.Tensor) -> ReducedTokens:
        """Run on one batch (within the engine's profile)."""
        stream = torch.cuda.current_stream()
        dtype = TORCH_DTYPES[self.engine.get_tensor_dtype("pixel_values").name]
        pixels = pixel_values.to("cuda", dtype).contiguous()
        self.context.set_input_shape("pixel_values", tuple(pixels.shape))
        self.context.set_tensor_address("pixel_values", pixels.data_ptr())
        outputs = {}
        for name in ("tokens", "lengths", "indices"):
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(
                shape, dtype=TORCH_DTYPES[self.engine.get_tensor_dtype(name).name], device="cuda"
            )
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise PrumergeError("TensorRT execution failed")
        stream.synchronize()
        width = int(outputs["lengths"].max())
        return ReducedTokens(outputs["tokens"][:, :width], outputs["lengths"], outputs["indices"][:, :width])
