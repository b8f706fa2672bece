"""Ahead-of-time compilation of the SparseKVAttention Triton kernel to PTX, for TensorRT's `aot_impl` (an engine
that runs without Python, e.g. in trtexec). Needs no GPU: Triton compiles for a named target."""

from __future__ import annotations

from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget

from .sparse_kv_attention import BLOCK_M, BLOCK_N, block_d, sparse_kv_attention_kernel

DTYPES = {"fp32": "*fp32", "fp16": "*fp16"}


@dataclass(frozen=True)
class CompiledKernel:
    """What TensorRT needs to launch a kernel it did not compile: entry name, PTX, warps and shared memory."""

    name: str
    ptx: str
    num_warps: int
    shared_bytes: int
    block_m: int = BLOCK_M


def compile_sparse_kv_attention(
    dtype: str, head_dim: int, causal: bool, capability: tuple[int, int] = (8, 0)
) -> CompiledKernel:
    """PTX of the kernel for `dtype` q/k/v/out ("fp32" or "fp16"), a fixed head size and causality, with a
    keep mask, for compute capability `capability`. Its launch grid is (B * H, ceil(Tq / block_m))."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    if not hasattr(sparse_kv_attention_kernel, "params"):
        raise RuntimeError("Triton's interpreter is on (TRITON_INTERPRET=1): it cannot compile kernels ahead of time")
    pointer = DTYPES[dtype]
    signature = {"q_ptr": pointer, "k_ptr": pointer, "v_ptr": pointer, "len_ptr": "*i32", "keep_ptr": "*i8",
                 "H": "i32", "GROUPS": "i32", "TQ": "i32", "TK": "i32", "D": "i32", "out_ptr": pointer,
                 "HAS_KEEP": "constexpr", "CAUSAL": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                 "BLOCK_D": "constexpr"}  # fmt: skip
    constants = {"HAS_KEEP": True, "CAUSAL": causal, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N,
                 "BLOCK_D": block_d(head_dim)}  # fmt: skip
    source = triton.compiler.ASTSource(fn=sparse_kv_attention_kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability[0] * 10 + capability[1], 32))
    return CompiledKernel(compiled.metadata.name, compiled.asm["ptx"], compiled.metadata.num_warps,
                          compiled.metadata.shared)  # fmt: skip
