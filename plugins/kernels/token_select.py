"""AdaptiveTokenSelect: PruMerge / PruMerge+ selection and merge as one Triton kernel, padded to Kmax.

Same contract as the `prumerge` / `prumerge+` reducers in export mode (`Reducer.for_export`): outputs
tokens [B, Kmax, C], lengths [B] and indices [B, Kmax] (-1 extra token, -2 padding). Kept patches are ranked
by descending score with ties broken by the lower index; the PyTorch reference is the reducer itself.

One program per image, one pass over the scores: the selection (IQR fence from the sorted scores, ranks, the
PruMerge+ raster grid) is computed once, then the output slots are produced BLOCK_K at a time up to the image's
own count (slots past it are padding: zeros, index -2):

1. the similarities of the tile's centres to NC patches at a time, `keys[centres] @ keys[chunk].T`, a `tl.dot`
   GEMM over channel chunks (tensor cores for fp16; fp32 stays IEEE unless `input_precision` says otherwise),
   the chunk's key norms taken from the same loads;
2. a running top-`knn` per centre (largest cosine similarity first, ties to the lower index), merged with each
   chunk by repeated row-wise max, so no tile ever spans all N patches;
3. each centre's token, its features plus the score-weighted features of its neighbours (a gather of the
   KNN rows); after the last tile, the extra token: the score-weighted sum of the pruned patches.

Nothing is written to scratch memory and there is one launch, so the same kernel serves the JIT plugin and,
compiled to PTX, the AOT one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..shapes import select_kmax

BLOCK_K = 16  # output slots per step (tl.dot's smallest M)
NC = 128  # patches per similarity chunk
CHUNK = 8  # rows of the rank loop
CHUNK_C = 16  # channels per GEMM / merge step
EXTRA_C = 64  # channels per step of the extra token
NUM_WARPS = 8
PRECISIONS = ("ieee", "tf32", "tf32x3")  # tl.dot input precision for fp32 inputs; fp16 always uses fp16 MMA


@triton.jit
def _quantile(sorted_row, pos: tl.constexpr, cols):
    lo: tl.constexpr = int(pos)
    hi: tl.constexpr = lo + 1
    frac: tl.constexpr = pos - lo
    v_lo = tl.sum(tl.where(cols == lo, sorted_row, 0.0), axis=0)
    v_hi = tl.sum(tl.where(cols == hi, sorted_row, 0.0), axis=0)
    return v_lo + frac * (v_hi - v_lo)


@triton.jit
def _slots(scores_row, s, rows, N, grid_end, IQR_K: tl.constexpr, GRID_DIV: tl.constexpr, Q1: tl.constexpr,
           Q3: tl.constexpr, PLUS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """Output slot of every patch (-1: pruned), the number of selected patches, the IQR fence and the PruMerge+
    grid stride (0 for PruMerge, or when no patch is an outlier: then there is no grid)."""
    real = rows < N
    ordered = tl.sort(s, 0)
    q1, q3 = _quantile(ordered, Q1, rows), _quantile(ordered, Q3, rows)
    fence = q3 + IQR_K * (q3 - q1)
    kept = real & (s > fence)
    count = tl.sum(kept.to(tl.int32), axis=0)
    # rank among kept patches: those with a higher score, or an equal one at a lower index (CHUNK at a time)
    rank = tl.zeros([BLOCK_N], dtype=tl.int32)
    for start in range(0, BLOCK_N, CHUNK):
        other = start + tl.arange(0, CHUNK)
        t = tl.load(scores_row + other, mask=other < N, other=float("-inf")).to(tl.float32)
        t_row, s_col = t[None, :], s[:, None]
        before = (t_row > s_col) | ((t_row == s_col) & (other[None, :] < rows[:, None]))
        rank += tl.sum((before & ((other < N) & (t > fence))[None, :]).to(tl.int32), axis=1)
    slot = tl.where(kept, rank, -1)
    total = count
    stride = count * 0
    if PLUS:
        per = tl.maximum(N // tl.maximum(count, 1), 1)
        stride = tl.maximum(per // GRID_DIV, 1)
        grid = real & (rows % stride == 0) & (rows < grid_end) & (~kept) & (count > 0)
        order = tl.cumsum(grid.to(tl.int32), axis=0) - 1
        slot = tl.where(grid, count + order, slot)
        total = count + tl.sum(grid.to(tl.int32), axis=0)
    return slot, total, fence, tl.where(count > 0, stride, 0)


@triton.jit
def _neighbours(keys_row, centre, is_centre, N, C, PRECISION: tl.constexpr, KNN: tl.constexpr,
                KNN_P2: tl.constexpr, BLOCK_K: tl.constexpr, NC: tl.constexpr, CHUNK_C: tl.constexpr):  # fmt: skip
    """[BLOCK_K, KNN_P2] similarities and patch indices of each centre's KNN most cosine-similar keys (itself
    excluded), largest first, ties to the lower index; -inf marks an empty entry."""
    pick = tl.arange(0, KNN_P2)
    centre_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for c0 in range(0, C, CHUNK_C):
        chans = c0 + tl.arange(0, CHUNK_C)
        mine = tl.load(keys_row + centre[:, None] * C + chans[None, :], mask=chans[None, :] < C, other=0.0)
        centre_sq += tl.sum(mine.to(tl.float32) * mine.to(tl.float32), axis=1)
    centre_norm = tl.maximum(tl.sqrt(centre_sq), 1e-12)
    best_val = tl.full([BLOCK_K, KNN_P2], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_K, KNN_P2], dtype=tl.int32)
    for n0 in range(0, N, NC):
        rows = n0 + tl.arange(0, NC)
        dots = tl.zeros([BLOCK_K, NC], dtype=tl.float32)
        sq = tl.zeros([NC], dtype=tl.float32)
        for c0 in range(0, C, CHUNK_C):
            chans = c0 + tl.arange(0, CHUNK_C)
            every = tl.load(keys_row + rows[:, None] * C + chans[None, :],
                            mask=(rows[:, None] < N) & (chans[None, :] < C), other=0.0)  # fmt: skip
            mine = tl.load(keys_row + centre[:, None] * C + chans[None, :], mask=chans[None, :] < C, other=0.0)
            dots = tl.dot(mine, tl.trans(every), dots, input_precision=PRECISION)
            sq += tl.sum(every.to(tl.float32) * every.to(tl.float32), axis=1)
        sims = dots / (tl.maximum(tl.sqrt(sq), 1e-12)[None, :] * centre_norm[:, None])
        candidate = (rows < N)[None, :] & (rows[None, :] != centre[:, None]) & is_centre[:, None]
        sims = tl.where(candidate, sims, float("-inf"))
        new_val = tl.full([BLOCK_K, KNN_P2], float("-inf"), tl.float32)
        new_idx = tl.zeros([BLOCK_K, KNN_P2], dtype=tl.int32)
        for t in range(KNN):  # the next best of (running list, chunk); a chosen entry becomes -inf
            top = tl.maximum(tl.max(sims, axis=1), tl.max(best_val, axis=1))
            from_chunk = tl.min(tl.where(sims == top[:, None], rows[None, :], N), axis=1)
            from_list = tl.min(tl.where(best_val == top[:, None], best_idx, N), axis=1)
            chosen = tl.minimum(from_chunk, from_list)
            sims = tl.where(rows[None, :] == chosen[:, None], float("-inf"), sims)
            best_val = tl.where(best_idx == chosen[:, None], float("-inf"), best_val)
            new_val = tl.where(pick[None, :] == t, top[:, None], new_val)
            new_idx = tl.where(pick[None, :] == t, chosen[:, None], new_idx)
        best_val, best_idx = new_val, new_idx
    return best_val, best_idx


@triton.jit
def _tile(x_row, keys_row, scores_row, tokens_row, idx_row, slot, total, start, N, C, KMAX,
          PRECISION: tl.constexpr, KNN: tl.constexpr, KNN_P2: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, NC: tl.constexpr, CHUNK_C: tl.constexpr):  # fmt: skip
    """Output slots start .. start + BLOCK_K - 1: kNN-merged centres, then zeros (the extra token's row is
    written after the last tile)."""
    j = start + tl.arange(0, BLOCK_K)
    is_centre = j < total
    centre = tl.sum(tl.where(slot[None, :] == j[:, None], tl.arange(0, BLOCK_N)[None, :], 0), axis=1)
    best_val, best_idx = _neighbours(keys_row, centre, is_centre, N, C, PRECISION, KNN, KNN_P2, BLOCK_K, NC,
                                     CHUNK_C)  # fmt: skip
    weight = tl.load(scores_row + best_idx).to(tl.float32)
    weight = tl.where((best_val > float("-inf")) & is_centre[:, None], weight, 0.0)
    for c0 in range(0, C, CHUNK_C):
        chans = c0 + tl.arange(0, CHUNK_C)
        own = tl.load(x_row + centre[:, None] * C + chans[None, :], mask=chans[None, :] < C, other=0.0)
        near = tl.load(x_row + best_idx[:, :, None] * C + chans[None, None, :], mask=chans[None, None, :] < C,
                       other=0.0)  # fmt: skip
        merged = own.to(tl.float32) + tl.sum(weight[:, :, None] * near.to(tl.float32), axis=1)
        merged = tl.where(is_centre[:, None], merged, 0.0)
        tl.store(tokens_row + j[:, None] * C + chans[None, :], merged.to(tokens_row.dtype.element_ty),
                 mask=(j[:, None] < KMAX) & (j[:, None] != total) & (chans[None, :] < C))  # fmt: skip
    index = tl.where(is_centre, centre, tl.where(j == total, -1, -2)).to(tl.int64)
    tl.store(idx_row + j, index, mask=j < KMAX)


@triton.jit
def _extra_token(x_row, scores_row, tokens_row, total, fence, stride, grid_end, N, C, PLUS: tl.constexpr,
                 NC: tl.constexpr, EXTRA_C: tl.constexpr):  # fmt: skip
    """Row `total`: the score-weighted sum of the pruned patches (neither outliers nor, for PruMerge+, on the
    grid), NC patches at a time; which patches are pruned follows from the fence and stride alone."""
    for c0 in range(0, C, EXTRA_C):
        chans = c0 + tl.arange(0, EXTRA_C)
        extra = tl.zeros([EXTRA_C], dtype=tl.float32)
        for n0 in range(0, N, NC):
            rows = n0 + tl.arange(0, NC)
            s = tl.load(scores_row + rows, mask=rows < N, other=0.0).to(tl.float32)
            selected = s > fence
            if PLUS:
                selected = selected | ((rows % tl.maximum(stride, 1) == 0) & (rows < grid_end) & (stride > 0))
            weight = tl.where(selected, 0.0, s)
            x = tl.load(x_row + rows[:, None] * C + chans[None, :], mask=(rows[:, None] < N) & (chans[None, :] < C),
                        other=0.0)  # fmt: skip
            extra += tl.sum(weight[:, None] * x.to(tl.float32), axis=0)
        tl.store(tokens_row + total * C + chans, extra.to(tokens_row.dtype.element_ty), mask=chans < C)


@triton.jit
def adaptive_token_select_kernel(
    x_ptr, scores_ptr, keys_ptr, N, C, KMAX, grid_end, tokens_ptr, len_ptr, idx_ptr,
    IQR_K: tl.constexpr, GRID_DIV: tl.constexpr, Q1: tl.constexpr, Q3: tl.constexpr, PLUS: tl.constexpr,
    KNN: tl.constexpr, KNN_P2: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NC: tl.constexpr, CHUNK: tl.constexpr, CHUNK_C: tl.constexpr, EXTRA_C: tl.constexpr,
):  # fmt: skip
    """Grid (B,). Parameters are ordered inputs, scalars, outputs: the launch convention of TensorRT's AOT
    plugins."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    scores_row, keys_row, x_row = scores_ptr + b * N, keys_ptr + b * N * C, x_ptr + b * N * C
    tokens_row, idx_row = tokens_ptr + b * KMAX * C, idx_ptr + b * KMAX
    s = tl.load(scores_row + rows, mask=rows < N, other=float("inf")).to(tl.float32)
    slot, total, fence, stride = _slots(scores_row, s, rows, N, grid_end, IQR_K, GRID_DIV, Q1, Q3, PLUS, BLOCK_N,
                                        CHUNK)  # fmt: skip
    tl.store(len_ptr + b, (total + 1).to(tl.int64))
    end = tl.cdiv(total + 1, BLOCK_K) * BLOCK_K
    for start in range(0, end, BLOCK_K):
        _tile(x_row, keys_row, scores_row, tokens_row, idx_row, slot, total, start, N, C, KMAX, PRECISION, KNN,
              KNN_P2, BLOCK_N, BLOCK_K, NC, CHUNK_C)  # fmt: skip
    _extra_token(x_row, scores_row, tokens_row, total, fence, stride, grid_end, N, C, PLUS, NC, EXTRA_C)
    zeros = tl.zeros([BLOCK_K, CHUNK_C], dtype=tl.float32).to(tokens_ptr.dtype.element_ty)
    for start in range(end, KMAX, BLOCK_K):  # padding
        j = start + tl.arange(0, BLOCK_K)
        for c0 in range(0, C, CHUNK_C):
            chans = c0 + tl.arange(0, CHUNK_C)
            pad_mask = (j[:, None] < KMAX) & (chans[None, :] < C)
            tl.store(tokens_row + j[:, None] * C + chans[None, :], zeros, mask=pad_mask)
        tl.store(idx_row + j, tl.full([BLOCK_K], -2, tl.int64), mask=j < KMAX)


def select_constants(n: int, c: int, plus: bool, iqr_k: float, knn: int, grid_div: int,
                     precision: str = "ieee") -> dict[str, object]:  # fmt: skip
    """The kernel's compile-time constants for `n` patches of width `c`."""
    if precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {', '.join(PRECISIONS)}")
    block_n = max(triton.next_power_of_2(n), 16)
    return {"IQR_K": iqr_k, "GRID_DIV": grid_div, "Q1": 0.25 * (n - 1), "Q3": 0.75 * (n - 1), "PLUS": plus,
            "KNN": min(knn, n - 1), "KNN_P2": triton.next_power_of_2(min(knn, n - 1)), "PRECISION": precision,
            "BLOCK_N": block_n, "BLOCK_K": BLOCK_K, "NC": min(block_n, NC), "CHUNK": CHUNK,
            "CHUNK_C": CHUNK_C, "EXTRA_C": EXTRA_C}  # fmt: skip


def adaptive_token_select(
    features: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    plus: bool,
    iqr_k: float = 1.5,
    knn: int = 32,
    grid_div: int = 3,
    grid_end: int | None = None,
    input_precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features, keys [B, N, C] and scores [B, N] -> tokens [B, Kmax, C], lengths [B], indices [B, Kmax]."""
    batch, n, c = features.shape
    kmax = select_kmax(n, plus)
    features, scores, keys = features.contiguous(), scores.contiguous(), keys.contiguous()
    tokens = torch.empty(batch, kmax, c, dtype=features.dtype, device=features.device)
    lengths = torch.empty(batch, dtype=torch.int64, device=features.device)
    indices = torch.empty(batch, kmax, dtype=torch.int64, device=features.device)
    end = n - 1 if grid_end is None else grid_end
    adaptive_token_select_kernel[(batch,)](
        features, scores, keys, n, c, kmax, end, tokens, lengths, indices,
        **select_constants(n, c, plus, iqr_k, knn, grid_div, input_precision), num_warps=NUM_WARPS, num_stages=1,
    )  # fmt: skip
    return tokens, lengths, indices
