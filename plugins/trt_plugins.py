"""TensorRT plugins (Python plugin API, `tensorrt.plugin`), namespace `prumerge`:

- `prumerge::AdaptiveTokenSelect`: features, scores, keys [B, N, C] / [B, N] -> tokens [B, Kmax, C], lengths [B],
  indices [B, Kmax]; the padded variant, which the plugin graph of `prumerge export --onnx --plugins` maps to.
- `prumerge::AdaptiveTokenSelectCount`: one image, a data-dependent output count declared through a size
  tensor (upper bound Kmax): tokens [K, C], indices [K] and K.
- `prumerge::SparseKVAttention`: q [B, H, Tq, D], k and v [B, Hkv, Tk, D], kv_lengths [B] (int32), keep
  [B, Tk] (int8) -> [B, H, Tq, D].

The JIT implementations launch the Triton kernels of `plugins/kernels` on TensorRT's stream; AdaptiveTokenSelect
and SparseKVAttention also have AOT implementations (the same kernels compiled to PTX by `plugins/kernels/aot.py`),
so their engines run without Python. AdaptiveTokenSelectCount is JIT only (its count comes from the padded
outputs). TensorRT is an optional extra: `register_plugins()` imports it and registers the definitions; nothing
here runs on import.
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the annotations of the decorated
# functions to tell input tensors (trtp.TensorDesc) from attributes.
from .shapes import select_kmax, select_opt

_REGISTERED = False


def register_plugins() -> None:
    """Register the plugin definitions with TensorRT's registry (once). Needs `tensorrt` >= 10.6."""
    global _REGISTERED
    if _REGISTERED:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch

    from .kernels.sparse_kv_attention import sparse_kv_attention
    from .kernels.token_select import adaptive_token_select

    def as_torch(t: trtp.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, device="cuda")

    def capability() -> tuple[int, int]:
        return torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0)

    def kernel_dtype(desc: trtp.TensorDesc) -> str:
        return "fp16" if desc.dtype == trt.float16 else "fp32"

    Desc = trtp.TensorDesc
    Three = tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]

    @trtp.register("prumerge::AdaptiveTokenSelect")
    def select_desc(features: Desc, scores: Desc, keys: Desc, plus: int, iqr_k: float, knn: int,
                    grid_div: int) -> Three:  # fmt: skip
        batch, n, width = features.shape_expr[0], features.shape_expr[1], features.shape_expr[2]
        kmax = select_kmax(n, bool(plus))
        return (trtp.from_shape_expr((batch, kmax, width), dtype=features.dtype),
                trtp.from_shape_expr((batch,), dtype=trt.int64),
                trtp.from_shape_expr((batch, kmax), dtype=trt.int64))  # fmt: skip

    @trtp.impl("prumerge::AdaptiveTokenSelect")
    def select_impl(features, scores, keys, plus, iqr_k, knn, grid_div, outputs, stream) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            tokens, lengths, indices = adaptive_token_select(
                as_torch(features), as_torch(scores), as_torch(keys), bool(plus), iqr_k, knn, grid_div
            )
            for out, value in zip(outputs, (tokens, lengths, indices), strict=True):
                as_torch(out).copy_(value)

    Aot = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]

    def launch_params(kernel, grid_x, grid_y) -> trtp.KernelLaunchParams:
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y = grid_x, grid_y
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared_bytes
        return launch

    def int_scalars(*values) -> trtp.SymIntExprs:
        scalars = trtp.SymIntExprs(len(values))
        for i, value in enumerate(values):
            scalars[i] = trtp.SymInt32(value)
        return scalars

    @trtp.aot_impl("prumerge::AdaptiveTokenSelect")
    def select_aot(features: Desc, scores: Desc, keys: Desc, plus: int, iqr_k: float, knn: int, grid_div: int,
                   outputs: tuple[Desc, Desc, Desc], tactic: int) -> Aot:  # fmt: skip
        from .kernels.aot import compile_adaptive_token_select
        from .kernels.token_select import SPLIT

        n, width = features.shape_expr[1], features.shape_expr[2]
        if not (n.is_constant and width.is_constant):
            raise ValueError("the AOT AdaptiveTokenSelect needs a static patch count and width")
        kernel = compile_adaptive_token_select(kernel_dtype(features), n.constant_value, width.constant_value,
                                               bool(plus), iqr_k, knn, grid_div, capability())  # fmt: skip
        kmax = select_kmax(n.constant_value, bool(plus))
        split = min(kmax, SPLIT)
        launch = launch_params(kernel, features.shape_expr[0], split)
        return kernel.name, kernel.ptx, launch, int_scalars(n, width, kmax, n - 1, split)  # N, C, KMAX, end, SPLIT

    @trtp.register("prumerge::AdaptiveTokenSelectCount")
    def count_desc(features: Desc, scores: Desc, keys: Desc, plus: int, iqr_k: float, knn: int,
                   grid_div: int) -> Three:  # fmt: skip
        n, width = features.shape_expr[1], features.shape_expr[2]
        count = trtp.size_tensor(select_opt(n), select_kmax(n, bool(plus)))
        return (trtp.from_shape_expr((count.expr(), width), dtype=features.dtype),
                trtp.from_shape_expr((count.expr(),), dtype=trt.int64), count)  # fmt: skip

    @trtp.impl("prumerge::AdaptiveTokenSelectCount")
    def count_impl(features, scores, keys, plus, iqr_k, knn, grid_div, outputs, stream) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            tokens, lengths, indices = adaptive_token_select(
                as_torch(features), as_torch(scores), as_torch(keys), bool(plus), iqr_k, knn, grid_div
            )
            k = int(lengths[0])
            width = tokens.shape[-1]
            as_torch(outputs[0].aliased((k, width))).copy_(tokens[0, :k])
            as_torch(outputs[1].aliased((k,))).copy_(indices[0, :k])
            as_torch(outputs[2]).fill_(k)

    @trtp.register("prumerge::SparseKVAttention")
    def attention_desc(q: Desc, k: Desc, v: Desc, kv_lengths: Desc, keep: Desc, causal: int) -> Desc:
        return q.like()

    @trtp.impl("prumerge::SparseKVAttention")
    def attention_impl(q, k, v, kv_lengths, keep, causal, outputs, stream) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = sparse_kv_attention(as_torch(q), as_torch(k), as_torch(v), as_torch(kv_lengths),
                                      as_torch(keep).bool(), bool(causal))  # fmt: skip
            as_torch(outputs[0]).copy_(out)

    @trtp.aot_impl("prumerge::SparseKVAttention")
    def attention_aot(q: Desc, k: Desc, v: Desc, kv_lengths: Desc, keep: Desc, causal: int, outputs: tuple[Desc],
                      tactic: int) -> Aot:  # fmt: skip
        from .kernels.aot import compile_sparse_kv_attention
        from .kernels.sparse_kv_attention import BLOCK_M

        head_dim = q.shape_expr[3]
        if not head_dim.is_constant:
            raise ValueError("the AOT SparseKVAttention needs a static head size")
        kernel = compile_sparse_kv_attention(kernel_dtype(q), head_dim.constant_value, bool(causal), capability())
        batch, heads, tq = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
        launch = launch_params(kernel, batch * heads, trtp.cdiv(tq, BLOCK_M))
        scalars = int_scalars(heads, heads // k.shape_expr[1], tq, k.shape_expr[2], head_dim)  # H, GROUPS, TQ, TK, D
        return kernel.name, kernel.ptx, launch, scalars

    @trtp.autotune("prumerge::SparseKVAttention")
    def attention_tune(q, k, v, kv_lengths, keep, causal, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, INT32, INT8, FP32|FP16")]

    _REGISTERED = True
