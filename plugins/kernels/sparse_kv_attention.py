"""SparseKVAttention: attention of new queries over a KV cache in which only kept entries count.

Key j of sequence b is visible to query i when j < kv_lengths[b], keep[b, j] (if a keep mask is given) and,
with `causal`, j <= kv_lengths[b] - Tq + i (the queries are the last Tq entries of the valid region). Query
heads share key/value heads in groups (GQA). A query that sees no key gets zeros.

The Triton kernel is flash-style: one program per (sequence, KV head, block of query rows), where a block packs
the query heads of one group with their queries (GROUPS x Tq rows), so each key/value tile is read once for the
whole group. It walks BLOCK_N keys at a time up to the sequence's valid length only (and, when causal, the last
key its rows can see), with an online softmax in base 2. For decoding at batch 1 the KV length is split over
SPLITS programs, each writing a partial result and its log-sum-exp, which a second small kernel combines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = {True: 32, False: 16}  # keys per step for fp16 / fp32 inputs: the largest tile ptxas fits without spills
LOG2E = tl.constexpr(1.4426950408889634)
PRECISIONS = ("ieee", "tf32", "tf32x3")  # tl.dot input precision for fp32 inputs


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
    out_ptr, part_ptr, lse_ptr,
    HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Contiguous q [B, H, TQ, D], k/v [B, H // GROUPS, TK, D], lengths [B] int32, keep [B, TK] int8, out like q.
    Grid (B * H // GROUPS, cdiv(GROUPS * TQ, BLOCK_M), SPLITS). With SPLITS > 1 the program writes its
    normalised partial output to part [B * H, SPLITS, TQ, D] and its log2-sum-exp to lse [B * H, SPLITS, TQ]
    (fp32) instead of `out`. Parameters are ordered inputs, scalars, outputs: TensorRT's AOT launch order."""
    kv_heads = H // GROUPS
    b = tl.program_id(0) // kv_heads
    kv_head = tl.program_id(0) % kv_heads
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows: (head in group, query)
    row_ok = r < GROUPS * TQ
    head = kv_head * GROUPS + r // TQ
    i = r % TQ
    dims = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (dims[None, :] < D)
    q_offsets = ((b * H + head).to(tl.int64) * TQ + i)[:, None] * D + dims[None, :]
    scale = LOG2E / tl.sqrt(D.to(tl.float32))
    q = tl.load(q_ptr + q_offsets, mask=io_mask, other=0.0)
    length = tl.load(len_ptr + b)
    last = length - TQ + i  # the last key each row may see when causal
    hi = length
    if CAUSAL:
        hi = tl.minimum(length, tl.max(tl.where(row_ok, last, 0), axis=0) + 1)
    per_split = tl.cdiv(tl.cdiv(hi, BLOCK_N), SPLITS) * BLOCK_N
    lo = tl.program_id(2) * per_split
    hi = tl.minimum(hi, lo + per_split)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_base = (b * kv_heads + kv_head).to(tl.int64) * TK * D
    k_head, v_head = k_ptr + kv_base, v_ptr + kv_base  # 64-bit bases; 32-bit offsets within a head
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        in_range = cols < hi
        offsets = cols[:, None] * D + dims[None, :]
        tile_mask = in_range[:, None] & (dims[None, :] < D)
        k = tl.load(k_head + offsets, mask=tile_mask, other=0.0)
        visible = in_range[None, :] & row_ok[:, None]
        if HAS_KEEP:
            kept = tl.load(keep_ptr + b * TK + cols, mask=in_range, other=0)
            visible = visible & (kept != 0)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= last[:, None])
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        logits = tl.where(visible, logits, float("-inf"))
        new_best = tl.maximum(best, tl.max(logits, axis=1))
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)
        p = tl.exp2(logits - safe[:, None])
        rescale = tl.exp2(best - safe)
        total = total * rescale + tl.sum(p, axis=1)
        v = tl.load(v_head + offsets, mask=tile_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        best = new_best
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    if SPLITS == 1:
        tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        split = tl.program_id(2)
        part_rows = ((b * H + head).to(tl.int64) * SPLITS + split) * TQ + i
        tl.store(part_ptr + part_rows[:, None] * D + dims[None, :], out, mask=io_mask)
        lse = tl.where(total > 0, best + tl.log2(tl.where(total > 0, total, 1.0)), float("-inf"))
        tl.store(lse_ptr + part_rows, lse, mask=row_ok)


@triton.jit
def combine_splits_kernel(part_ptr, lse_ptr, TQ, D, out_ptr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_D: tl.constexpr):  # fmt: skip
    """Grid (B * H, TQ): out = the splits' partial outputs weighted by their softmax mass."""
    row = tl.program_id(0).to(tl.int64) * TQ + tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    part_rows = (tl.program_id(0).to(tl.int64) * SPLITS + splits) * TQ + tl.program_id(1)
    lse = tl.load(lse_ptr + part_rows, mask=splits < SPLITS, other=float("-inf"))
    best = tl.max(lse, axis=0)
    weight = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - tl.where(best == float("-inf"), 0.0, best)))
    parts = tl.load(part_ptr + part_rows[:, None] * D + dims[None, :], mask=(splits[:, None] < SPLITS) &
                    (dims[None, :] < D), other=0.0)  # fmt: skip
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + dims, out.to(out_ptr.dtype.element_ty), mask=dims < D)


def block_d(head_dim: int) -> int:
    """The head-dimension tile: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def block_m(rows: int) -> int:
    """Query rows per program: 16 for decoding (a group's heads x one query), 64 for longer query blocks."""
    return 16 if rows <= 16 else 64


def attention_constants(head_dim: int, causal: bool, rows: int, has_keep: bool, splits: int, half: bool,
                        precision: str = "ieee") -> dict[str, object]:  # fmt: skip
    """The kernel's compile-time constants; `rows` = query heads per KV head x queries, `half` for fp16 inputs."""
    if precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {', '.join(PRECISIONS)}")
    return {"HAS_KEEP": has_keep, "CAUSAL": causal, "SPLITS": splits, "PRECISION": precision,
            "BLOCK_M": block_m(rows), "BLOCK_N": BLOCK_N[half], "BLOCK_D": block_d(head_dim)}  # fmt: skip


def default_splits(programs: int, kv_length: int, device: torch.device) -> int:
    """KV splits so that about two programs run per multiprocessor, each over at least 128 keys."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 108
    wanted = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(wanted, kv_length // 128, 16))


def sparse_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lengths: torch.Tensor,
    keep: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    splits: int | None = None,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """The Triton kernels; same contract as `sparse_kv_attention_reference`. `splits` divides the KV length
    among programs (None: enough to fill the GPU when batch x heads x query blocks cannot)."""
    b, h, tq, d = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    groups = h // kv_heads
    if scale is not None:  # the kernel scales by 1/sqrt(D); fold any other scale into q
        q = q * (scale * d**0.5)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lengths = kv_lengths.to(torch.int32).contiguous()
    keep_i8 = keep.to(torch.int8).contiguous() if keep is not None else lengths
    half = q.dtype == torch.float16
    constants = attention_constants(d, causal, groups * tq, keep is not None, 1, half, input_precision)
    row_blocks = triton.cdiv(groups * tq, constants["BLOCK_M"])
    if splits is None:
        splits = default_splits(b * kv_heads * row_blocks, tk, q.device)
    constants["SPLITS"] = splits
    part = lse = None
    if splits > 1:
        part = torch.empty(b * h, splits, tq, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b * h, splits, tq, dtype=torch.float32, device=q.device)
    sparse_kv_attention_kernel[(b * kv_heads, row_blocks, splits)](
        q, k, v, lengths, keep_i8, h, groups, tq, tk, d, out, part, lse, **constants, num_stages=1
    )
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        combine_splits_kernel[(b * h, tq)](part, lse, tq, d, out, SPLITS=splits, BLOCK_S=block_s,
                                           BLOCK_D=constants["BLOCK_D"])  # fmt: skip
    return out
