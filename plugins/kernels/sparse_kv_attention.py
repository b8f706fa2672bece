"""SparseKVAttention: attention of new queries over a KV cache in which only kept entries count.

Key j of sequence b is visible to query i when j < kv_lengths[b], keep[b, j] (if a keep mask is given) and,
with `causal`, j <= kv_lengths[b] - Tq + i (the queries are the last Tq entries of the valid region). Query
heads share key/value heads in groups (GQA). A query that sees no key gets zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def visible_mask(kv_lengths: torch.Tensor, keep: torch.Tensor | None, tq: int, tk: int, causal: bool) -> torch.Tensor:
    """[B, Tq, Tk] bool: which keys each query sees."""
    j = torch.arange(tk, device=kv_lengths.device)
    mask = (j[None, :] < kv_lengths[:, None])[:, None, :].expand(-1, tq, -1)
    if keep is not None:
        mask = mask & keep[:, None, :]
    if causal:
        i = torch.arange(tq, device=kv_lengths.device)
        last = kv_lengths[:, None] - tq + i[None, :]
        mask = mask & (j[None, None, :] <= last[:, :, None])
    return mask


def sparse_kv_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lengths: torch.Tensor,
    keep: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """q [B, H, Tq, D], k and v [B, Hkv, Tk, D] -> [B, H, Tq, D], computed in fp32, returned in q's dtype."""
    _, h, tq, d = q.shape
    groups = h // k.shape[1]
    kf = k.float().repeat_interleave(groups, dim=1)
    vf = v.float().repeat_interleave(groups, dim=1)
    logits = (q.float() @ kf.transpose(-1, -2)) * (scale if scale is not None else d**-0.5)
    mask = visible_mask(kv_lengths, keep, tq, k.shape[2], causal)[:, None]
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.nan_to_num(logits.softmax(-1), nan=0.0)
    return (probs @ vf).to(q.dtype)


@triton.jit
def _sparse_kv_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, len_ptr, keep_ptr,
    H, GROUPS, TQ, TK, D, scale,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, so_b, so_h, so_t, skeep_b,
    HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // H
    head = bh % H
    kv_head = head // GROUPS
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    length = tl.load(len_ptr + b)
    q = tl.load(q_ptr + b * sq_b + head * sq_h + rows[:, None] * sq_t + dims[None, :],
                mask=(rows[:, None] < TQ) & (dims[None, :] < D), other=0.0).to(tl.float32)  # fmt: skip
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    last = length - TQ + rows
    for start in range(0, TK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        base = b * sk_b + kv_head * sk_h + cols[:, None] * sk_t + dims[None, :]
        in_range = (cols[:, None] < TK) & (dims[None, :] < D)
        k = tl.load(k_ptr + base, mask=in_range, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base, mask=in_range, other=0.0).to(tl.float32)
        visible = (cols < length)[None, :] & (rows < TQ)[:, None]
        if HAS_KEEP:
            kept = tl.load(keep_ptr + b * skeep_b + cols, mask=cols < TK, other=0)
            visible = visible & (kept != 0)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= last[:, None])
        logits = tl.where(visible, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        new_best = tl.maximum(best, tl.max(logits, axis=1))
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)
        p = tl.exp(logits - safe[:, None])
        rescale = tl.exp(best - safe)
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p, v)
        best = new_best
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + b * so_b + head * so_h + rows[:, None] * so_t + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < TQ) & (dims[None, :] < D))  # fmt: skip


def sparse_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lengths: torch.Tensor,
    keep: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """The Triton kernel; same contract as `sparse_kv_attention_reference`."""
    b, h, tq, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lengths = kv_lengths.to(torch.int32).contiguous()
    keep_i8 = keep.to(torch.int8).contiguous() if keep is not None else lengths
    block_m = 16
    grid = (b * h, triton.cdiv(tq, block_m))
    _sparse_kv_attention_kernel[grid](
        q, k, v, out, lengths, keep_i8, h, h // k.shape[1], tq, k.shape[2], d,
        scale if scale is not None else d**-0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), keep_i8.stride(0) if keep is not None else 0,
        HAS_KEEP=keep is not None, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=16,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip
    return out
