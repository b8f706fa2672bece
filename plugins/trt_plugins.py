"""TensorRT plugins (Python plugin API, `tensorrt.plugin`), namespace `prumerge`, for TensorRT >= 10.9, < 12:

- `prumerge::AdaptiveTokenSelect`: features, scores, keys [B, N, C] / [B, N] -> tokens [B, Kmax, C], lengths [B],
  indices [B, Kmax]; the padded variant, which the plugin graph of `prumerge export --onnx --plugins` maps to.
- `prumerge::AdaptiveTokenSelectCount`: the images' tokens packed one after another, a data-dependent row count
  declared through a size tensor (upper bound B x Kmax): tokens [T, C], indices [T], lengths [B] and T.
- `prumerge::SparseKVAttention`: q [B, H, Tq, D], k and v [B, Hkv, Tk, D], kv_lengths [B] (int32), keep
  [B, Tk] (int8) -> [B, H, Tq, D].

The JIT implementations launch the Triton kernels of `plugins/kernels` on TensorRT's stream and never read device
memory from the host (CUDA-graph capture stays possible); AdaptiveTokenSelect and SparseKVAttention also have AOT
implementations (the same kernels compiled to PTX by `plugins/kernels/aot.py`), so their engines run without
Python. Attributes are declared as one-element NumPy arrays, the form in which TensorRT's ONNX parser passes
plugin fields (TensorRT 10.9-11.3 convert builtin-typed fields with `int(array)`, which NumPy >= 2.4 rejects).
TensorRT is an optional extra: `register_plugins()` checks its version, then registers; nothing runs on import.
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the annotations of the decorated
# functions to tell input tensors (trtp.TensorDesc) from attributes.
import numpy as np
import numpy.typing as npt

from .shapes import select_kmax, select_opt

_REGISTERED = False
Int = npt.NDArray[np.int64]
Float = npt.NDArray[np.float64]


def register_plugins() -> None:
    """Register the plugin definitions with TensorRT's registry (once); a TensorRT outside the supported range is
    refused before anything is registered."""
    global _REGISTERED
    if _REGISTERED:
        return
    import tensorrt as trt

    from ..exporters.trt_support import check_tensorrt_version

    check_tensorrt_version(trt.__version__)
    import tensorrt.plugin as trtp

    _define(trt, trtp)
    _REGISTERED = True


def _define(trt, trtp) -> None:
    Desc = trtp.TensorDesc
    Three = tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]
    Four = tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]
    Aot = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]

    @trtp.register("prumerge::AdaptiveTokenSelect")
    def select_desc(features: Desc, scores: Desc, keys: Desc, plus: Int, iqr_k: Float, knn: Int,
                    grid_div: Int) -> Three:  # fmt: skip
        batch, n, width = features.shape_expr[0], features.shape_expr[1], features.shape_expr[2]
        kmax = select_kmax(n, bool(plus[0]))
        return (trtp.from_shape_expr((batch, kmax, width), dtype=features.dtype),
                trtp.from_shape_expr((batch,), dtype=trt.int64),
                trtp.from_shape_expr((batch, kmax), dtype=trt.int64))  # fmt: skip

    @trtp.impl("prumerge::AdaptiveTokenSelect")
    def select_impl(features, scores, keys, plus, iqr_k, knn, grid_div, outputs, stream) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            results = _select(features, scores, keys, plus, iqr_k, knn, grid_div)
            for out, value in zip(outputs, results, strict=True):
                _as_torch(out).copy_(value)

    @trtp.aot_impl("prumerge::AdaptiveTokenSelect")
    def select_aot(features: Desc, scores: Desc, keys: Desc, plus: Int, iqr_k: Float, knn: Int, grid_div: Int,
                   outputs: Three, tactic: int) -> Aot:  # fmt: skip
        from .kernels.aot import compile_adaptive_token_select

        n, width = features.shape_expr[1], features.shape_expr[2]
        if not (n.is_constant and width.is_constant):
            raise ValueError("the AOT AdaptiveTokenSelect needs a static patch count and width")
        n_value, width_value, is_plus = n.constant_value(), width.constant_value(), bool(plus[0])
        params = (float(iqr_k[0]), int(knn[0]), int(grid_div[0]))
        kernel = compile_adaptive_token_select(_kernel_dtype(trt, features), n_value, width_value, is_plus, *params,
                                               _capability())  # fmt: skip
        launch = _launch_params(trtp, kernel, features.shape_expr[0])
        scalars = _int_scalars(trtp, n, width, select_kmax(n_value, is_plus), n - 1)  # N, C, Kmax, grid end
        return kernel.name, kernel.ptx, launch, scalars

    @trtp.register("prumerge::AdaptiveTokenSelectCount")
    def count_desc(features: Desc, scores: Desc, keys: Desc, plus: Int, iqr_k: Float, knn: Int,
                   grid_div: Int) -> Four:  # fmt: skip
        batch, n, width = features.shape_expr[0], features.shape_expr[1], features.shape_expr[2]
        rows = trtp.size_tensor(select_opt(n) * batch, select_kmax(n, bool(plus[0])) * batch)
        return (trtp.from_shape_expr((rows.expr(), width), dtype=features.dtype),
                trtp.from_shape_expr((rows.expr(),), dtype=trt.int64),
                trtp.from_shape_expr((batch,), dtype=trt.int64), rows)  # fmt: skip

    @trtp.impl("prumerge::AdaptiveTokenSelectCount")
    def count_impl(features, scores, keys, plus, iqr_k, knn, grid_div, outputs, stream) -> None:
        import torch

        from .packing import pack_rows

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            tokens, lengths, indices = _select(features, scores, keys, plus, iqr_k, knn, grid_div)
            packed_tokens, packed_indices, count = pack_rows(tokens, indices, lengths)
            _as_torch(outputs[0].aliased(tuple(packed_tokens.shape))).copy_(packed_tokens)
            _as_torch(outputs[1].aliased(tuple(packed_indices.shape))).copy_(packed_indices)
            _as_torch(outputs[2]).copy_(lengths)
            _as_torch(outputs[3]).copy_(count)

    @trtp.register("prumerge::SparseKVAttention")
    def attention_desc(q: Desc, k: Desc, v: Desc, kv_lengths: Desc, keep: Desc, causal: Int) -> Desc:
        return q.like()

    @trtp.impl("prumerge::SparseKVAttention")
    def attention_impl(q, k, v, kv_lengths, keep, causal, outputs, stream) -> None:
        import torch

        from .kernels.sparse_kv_attention import sparse_kv_attention

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = sparse_kv_attention(_as_torch(q), _as_torch(k), _as_torch(v), _as_torch(kv_lengths),
                                      _as_torch(keep).bool(), bool(causal[0]))  # fmt: skip
            _as_torch(outputs[0]).copy_(out)

    @trtp.aot_impl("prumerge::SparseKVAttention")
    def attention_aot(q: Desc, k: Desc, v: Desc, kv_lengths: Desc, keep: Desc, causal: Int, outputs: tuple[Desc],
                      tactic: int) -> Aot:  # fmt: skip
        from .kernels.aot import compile_sparse_kv_attention
        from .kernels.sparse_kv_attention import block_m

        batch, heads, tq, head_dim = (q.shape_expr[i] for i in range(4))
        kv_heads = k.shape_expr[1]
        if not (head_dim.is_constant and heads.is_constant and kv_heads.is_constant):
            raise ValueError("the AOT SparseKVAttention needs static head counts and head size")
        groups = heads.constant_value() // kv_heads.constant_value()
        rows = groups * tq.constant_value() if tq.is_constant else 64  # packed rows per program
        dtype = _kernel_dtype(trt, q)
        kernel = compile_sparse_kv_attention(dtype, head_dim.constant_value(), bool(causal[0]), rows, _capability())
        launch = _launch_params(trtp, kernel, batch * kv_heads, trtp.cdiv(tq * groups, block_m(rows)))
        scalars = _int_scalars(trtp, heads, groups, tq, k.shape_expr[2], head_dim)  # H, GROUPS, TQ, TK, D
        return kernel.name, kernel.ptx, launch, scalars

    @trtp.autotune("prumerge::SparseKVAttention")
    def attention_tune(q, k, v, kv_lengths, keep, causal, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, INT32, INT8, FP32|FP16")]


def _as_torch(tensor):
    import torch

    return torch.as_tensor(tensor, device="cuda")


def _select(features, scores, keys, plus, iqr_k, knn, grid_div):
    from .kernels.token_select import adaptive_token_select

    return adaptive_token_select(_as_torch(features), _as_torch(scores), _as_torch(keys), bool(plus[0]),
                                 float(iqr_k[0]), int(knn[0]), int(grid_div[0]))  # fmt: skip


def _capability() -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0)


def _kernel_dtype(trt, desc) -> str:
    return "fp16" if desc.dtype == trt.float16 else "fp32"


def _launch_params(trtp, kernel, grid_x, grid_y=1):
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y = grid_x, grid_y
    launch.block_x = kernel.num_warps * 32
    launch.shared_mem = kernel.shared_bytes
    return launch


def _int_scalars(trtp, *values):
    scalars = trtp.SymIntExprs(len(values))
    for i, value in enumerate(values):
        scalars[i] = trtp.SymInt32(value)
    return scalars
