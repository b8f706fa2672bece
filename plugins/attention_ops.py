"""The sparse-KV attention as ONE custom ONNX node that TensorRT's ONNX parser maps to the
`prumerge::SparseKVAttention` plugin: its ONNX schema, a torch custom op (CPU implementation = the PyTorch
reference) with an onnxscript translation, and an onnxruntime-extensions Python op for ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxscript
import torch
from onnx.defs import OpSchema

from .kernels.sparse_kv_attention import sparse_kv_attention_reference
from .onnx_ops import DOMAIN, VERSION, register_node_schema

OP_TYPE = "SparseKVAttention"
ATTRIBUTES = {"causal": OpSchema.AttrType.INT, "plugin_namespace": OpSchema.AttrType.STRING,
              "plugin_version": OpSchema.AttrType.STRING, "aot": OpSchema.AttrType.INT}  # fmt: skip


def register_schema() -> None:
    """Register the SparseKVAttention node's schema."""
    register_node_schema(
        OP_TYPE, "Attention of q [B, H, Tq, D] over k, v [B, Hkv, Tk, D]: keys j < kv_lengths[b] with keep[b, j].",
        [("q", "T"), ("k", "T"), ("v", "T"), ("kv_lengths", "tensor(int32)"), ("keep", "tensor(int8)")],
        [("out", "T")], ATTRIBUTES,
    )  # fmt: skip


@torch.library.custom_op("prumerge::sparse_kv_attention", mutates_args=())
def sparse_kv_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor, keep: torch.Tensor, causal: int
) -> torch.Tensor:
    """Torch custom op for export; runs the reference."""
    return sparse_kv_attention_reference(q, k, v, kv_lengths, keep.bool(), bool(causal)).contiguous()


@sparse_kv_attention.register_fake
def _(q, k, v, kv_lengths, keep, causal):
    return torch.empty_like(q)


_OPSET = onnxscript.values.Opset(DOMAIN, int(VERSION))


def translation(aot: bool):
    """The onnxscript translation; `aot` asks TensorRT for the ahead-of-time implementation."""

    def _translate(q, k, v, kv_lengths, keep, causal: int):
        register_schema()
        return _OPSET.SparseKVAttention(q, k, v, kv_lengths, keep, causal=causal, plugin_namespace=DOMAIN,
                                        plugin_version=VERSION, aot=int(aot))  # fmt: skip

    return _translate


def translation_table(aot: bool = False) -> dict:
    """For `torch.onnx.export(custom_translation_table=...)`."""
    register_schema()
    return {torch.ops.prumerge.sparse_kv_attention.default: translation(aot)}


def register_ort_pyop() -> None:
    """Register the reference as an onnxruntime-extensions Python op (idempotent)."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    if getattr(register_ort_pyop, "done", False):
        return
    attrs = {"causal": PyCustomOpDef.dt_int64, "aot": PyCustomOpDef.dt_int64,
             "plugin_namespace": PyCustomOpDef.dt_string, "plugin_version": PyCustomOpDef.dt_string}  # fmt: skip
    inputs = [PyCustomOpDef.dt_float] * 3 + [PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int8]

    @onnx_op(op_type=OP_TYPE, inputs=inputs, outputs=[PyCustomOpDef.dt_float], attrs=attrs)
    def _run(q, k, v, kv_lengths, keep, causal=0, **_names):
        tensors = [torch.from_numpy(np.asarray(a)) for a in (q, k, v, kv_lengths, keep)]
        return sparse_kv_attention_reference(*tensors[:4], tensors[4].bool(), bool(causal)).numpy()

    register_ort_pyop.done = True
