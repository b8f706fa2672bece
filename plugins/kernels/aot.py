"""Ahead-of-time compilation of the plugin kernels to PTX, for TensorRT's `aot_impl` (an engine that runs without
Python, e.g. in trtexec). Needs no GPU: Triton compiles for a named target. Each kernel takes its parameters in
TensorRT's launch order: input pointers, the scalars the plugin passes, output pointers.

The PTX is emitted at ISA version PTX_VERSION (8.4, CUDA 12.4), whatever CUDA Triton bundles, so that the CUDA 12
driver TensorRT's cu12 wheels run on accepts it (Triton would otherwise write its own ptxas's newest version,
e.g. 9.4 for sm_90a, which CUDA 12.x rejects)."""

from __future__ import annotations

from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget

from .sparse_kv_attention import attention_constants, sparse_kv_attention_kernel
from .token_select import NUM_WARPS, adaptive_token_select_kernel, select_constants

DTYPES = {"fp32": "*fp32", "fp16": "*fp16"}
PTX_VERSION = 84


@dataclass(frozen=True)
class CompiledKernel:
    """What TensorRT needs to launch a kernel it did not compile: entry name, PTX, warps and shared memory."""

    name: str
    ptx: str
    num_warps: int
    shared_bytes: int


def pointer_type(dtype: str) -> str:
    """Triton's pointer type for "fp32" or "fp16" tensors."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def compile_ptx(fn: triton.JITFunction, signature: dict[str, str], constants: dict[str, object],
                capability: tuple[int, int], num_warps: int = 4) -> CompiledKernel:  # fmt: skip
    """PTX of a Triton kernel for `signature` (pointer and scalar types, "constexpr" for `constants`). One
    pipeline stage, as the JIT launches: deeper software pipelining costs registers these kernels need."""
    if not hasattr(fn, "params"):
        raise RuntimeError("Triton's interpreter is on (TRITON_INTERPRET=1): it cannot compile kernels ahead of time")
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    options = {"num_warps": num_warps, "num_stages": 1, "ptx_version": PTX_VERSION}
    compiled = triton.compile(source, target=target, options=options)
    return CompiledKernel(compiled.metadata.name, compiled.asm["ptx"], compiled.metadata.num_warps,
                          compiled.metadata.shared)  # fmt: skip


def compile_sparse_kv_attention(
    dtype: str, head_dim: int, causal: bool, rows: int, capability: tuple[int, int] = (8, 0),
    input_precision: str = "ieee",
) -> CompiledKernel:  # fmt: skip
    """PTX of the attention kernel for `dtype` q/k/v/out ("fp32" or "fp16"), a fixed head size and causality,
    with a keep mask, for `rows` = query heads per KV head x queries (what one program's tile packs), for compute
    capability `capability`. One split over the KV length (the AOT interface has one launch and no workspace)."""
    pointer = pointer_type(dtype)
    constants = attention_constants(head_dim, causal, rows, True, 1, dtype == "fp16", input_precision)
    signature = {"q_ptr": pointer, "k_ptr": pointer, "v_ptr": pointer, "len_ptr": "*i32", "keep_ptr": "*i8",
                 "H": "i32", "GROUPS": "i32", "TQ": "i32", "TK": "i32", "D": "i32", "out_ptr": pointer,
                 "part_ptr": "constexpr", "lse_ptr": "constexpr", **dict.fromkeys(constants, "constexpr")}  # fmt: skip
    constants = {"part_ptr": None, "lse_ptr": None, **constants}
    return compile_ptx(sparse_kv_attention_kernel, signature, constants, capability, num_warps=4)


def compile_adaptive_token_select(
    dtype: str, n: int, c: int, plus: bool, iqr_k: float, knn: int, grid_div: int,
    capability: tuple[int, int] = (8, 0), input_precision: str = "ieee",
) -> CompiledKernel:  # fmt: skip
    """PTX of the AdaptiveTokenSelect kernel for `dtype` features/scores/keys/tokens and `n` patches of width `c`
    (both static in an engine). Its launch grid is (B,); the scalars are N, C, Kmax and the grid end."""
    pointer = pointer_type(dtype)
    constants = select_constants(n, c, plus, iqr_k, knn, grid_div, input_precision)
    signature = {"x_ptr": pointer, "scores_ptr": pointer, "keys_ptr": pointer, "N": "i32", "C": "i32",
                 "KMAX": "i32", "grid_end": "i32", "tokens_ptr": pointer, "len_ptr": "*i64",
                 "idx_ptr": "*i64", **dict.fromkeys(constants, "constexpr")}  # fmt: skip
    return compile_ptx(adaptive_token_select_kernel, signature, constants, capability, num_warps=NUM_WARPS)
