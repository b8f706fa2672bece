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
def sparse_kv_attention_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, keep_ptr,
    H, GROUPS, TQ, TK, D,
    out_ptr,
    HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Contiguous q [B, H, TQ, D], k/v [B, H // GROUPS, TK, D], lengths [B] int32, keep [B, TK] int8, out like q.
    Parameters are ordered inputs, scalars, output: the launch convention of TensorRT's AOT plugins."""
    bh = tl.program_id(0)
    b = bh // H
    head = bh % H
    kv_head = head // GROUPS
    kv_heads = H // GROUPS
    scale = 1.0 / tl.sqrt(D.to(tl.float32))
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    length = tl.load(len_ptr + b)
    q_base = (b * H + head).to(tl.int64) * TQ * D
    q = tl.load(q_ptr + q_base + rows[:, None] * D + dims[None, :],
                mask=(rows[:, None] < TQ) & (dims[None, :] < D), other=0.0).to(tl.float32)  # fmt: skip
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    last = length - TQ + rows
    kv_base = (b * kv_heads + kv_head).to(tl.int64) * TK * D
    for start in range(0, TK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        offsets = kv_base + cols[:, None] * D + dims[None, :]
        in_range = (cols[:, None] < TK) & (dims[None, :] < D)
        k = tl.load(k_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
        visible = (cols < length)[None, :] & (rows < TQ)[:, None]
        if HAS_KEEP:
            kept = tl.load(keep_ptr + b * TK + cols, mask=cols < TK, other=0)
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
    tl.store(out_ptr + q_base + rows[:, None] * D + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < TQ) & (dims[None, :] < D))  # fmt: skip


BLOCK_M = 16
BLOCK_N = 16


def block_d(head_dim: int) -> int:
    """The head-dimension tile: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


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
    if scale is not None:  # the kernel scales by 1/sqrt(D); fold any other scale into q
        q = q * (scale * d**0.5)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lengths = kv_lengths.to(torch.int32).contiguous()
    keep_i8 = keep.to(torch.int8).contiguous() if keep is not None else lengths
    grid = (b * h, triton.cdiv(tq, BLOCK_M))
    sparse_kv_attention_kernel[grid](
        q, k, v, lengths, keep_i8, h, h // k.shape[1], tq, k.shape[2], d, out,
        HAS_KEEP=keep is not None, CAUSAL=causal, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d(d),
    )  # fmt: skip
    return out
