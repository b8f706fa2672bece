"""AdaptiveTokenSelect: PruMerge / PruMerge+ selection and merge as Triton kernels, padded to Kmax.

Same contract as the `prumerge` / `prumerge+` reducers in export mode (`Reducer.for_export`): outputs
tokens [B, Kmax, C], lengths [B] and indices [B, Kmax] (-1 extra token, -2 padding). Kept patches are ranked
by descending score with ties broken by the lower index; the PyTorch reference is the reducer itself.

Three kernels: `_select` (one program per image: the IQR fence from a sorted row, ranks, the raster grid by
cumulative sum, slots scattered into `indices`), `_merge` (one program per output slot: cosine similarity
of the centre's key to every key, the k nearest by repeated arg-max, the residual sum) and `_extra` (one
program per image: the score-weighted sum of the pruned patches, written after the last centre).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reducers.selection import max_outliers

EXTRA, PAD = -1, -2


@triton.jit
def _quantile(sorted_row, pos: tl.constexpr, cols):
    lo: tl.constexpr = int(pos)
    hi: tl.constexpr = lo + 1
    frac: tl.constexpr = pos - lo
    v_lo = tl.sum(tl.where(cols == lo, sorted_row, 0.0), axis=0)
    v_hi = tl.sum(tl.where(cols == hi, sorted_row, 0.0), axis=0)
    return v_lo + frac * (v_hi - v_lo)


@triton.jit
def _select(
    scores_ptr, idx_ptr, len_ptr, pruned_ptr, N, KMAX, iqr_k, grid_div, grid_end,
    Q1: tl.constexpr, Q3: tl.constexpr, PLUS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    real = cols < N
    s = tl.load(scores_ptr + b * N + cols, mask=real, other=float("inf")).to(tl.float32)
    ordered = tl.sort(s, 0)
    q1, q3 = _quantile(ordered, Q1, cols), _quantile(ordered, Q3, cols)
    kept = real & (s > q3 + iqr_k * (q3 - q1))
    count = tl.sum(kept.to(tl.int32), axis=0)
    # rank among kept patches: those with a higher score, or an equal one at a lower index
    s_row, s_col = s[None, :], s[:, None]
    before = (s_row > s_col) | ((s_row == s_col) & (cols[None, :] < cols[:, None]))
    rank = tl.sum((before & kept[None, :]).to(tl.int32), axis=1)
    slot = tl.where(kept, rank, -1)
    total = count
    if PLUS:
        per = tl.maximum(N // tl.maximum(count, 1), 1)
        stride = tl.maximum(per // grid_div, 1)
        grid = real & (cols % stride == 0) & (cols < grid_end) & (~kept) & (count > 0)
        order = tl.cumsum(grid.to(tl.int32), axis=0) - 1
        slot = tl.where(grid, count + order, slot)
        total = count + tl.sum(grid.to(tl.int32), axis=0)
    tl.store(idx_ptr + b * KMAX + slot, cols.to(tl.int64), mask=slot >= 0)
    tl.store(pruned_ptr + b * N + cols, (slot < 0).to(tl.int8), mask=real)
    tl.store(len_ptr + b, (total + 1).to(tl.int64))
    tl.store(idx_ptr + b * KMAX + total, tl.full([], -1, tl.int64))


@triton.jit
def _merge(
    x_ptr, keys_ptr, scores_ptr, idx_ptr, len_ptr, out_ptr, N, C, KMAX,
    KNN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    slot = tl.program_id(1)
    if slot < tl.load(len_ptr + b) - 1:
        rows = tl.arange(0, BLOCK_N)
        chans = tl.arange(0, BLOCK_C)
        centre = tl.load(idx_ptr + b * KMAX + slot)
        inside = (rows[:, None] < N) & (chans[None, :] < C)
        keys = tl.load(keys_ptr + b * N * C + rows[:, None] * C + chans[None, :], mask=inside, other=0.0).to(tl.float32)
        unit = keys / tl.maximum(tl.sqrt(tl.sum(keys * keys, axis=1)), 1e-12)[:, None]
        mine = tl.sum(tl.where(rows[:, None] == centre, unit, 0.0), axis=0)
        sims = tl.sum(unit * mine[None, :], axis=1)
        sims = tl.where((rows < N) & (rows != centre), sims, float("-inf"))
        x_row = x_ptr + b * N * C
        acc = tl.load(x_row + centre * C + chans, mask=chans < C, other=0.0).to(tl.float32)
        for _ in range(KNN):
            best = tl.argmax(sims, axis=0)
            weight = tl.load(scores_ptr + b * N + best).to(tl.float32)
            acc += weight * tl.load(x_row + best * C + chans, mask=chans < C, other=0.0).to(tl.float32)
            sims = tl.where(rows == best, float("-inf"), sims)
        tl.store(out_ptr + (b * KMAX + slot) * C + chans, acc.to(out_ptr.dtype.element_ty), mask=chans < C)


@triton.jit
def _extra(x_ptr, scores_ptr, pruned_ptr, len_ptr, out_ptr, N, C, KMAX, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.arange(0, BLOCK_N)
    chans = tl.arange(0, BLOCK_C)
    w = tl.load(scores_ptr + b * N + rows, mask=rows < N, other=0.0).to(tl.float32)
    w = w * tl.load(pruned_ptr + b * N + rows, mask=rows < N, other=0).to(tl.float32)
    x = tl.load(x_ptr + b * N * C + rows[:, None] * C + chans[None, :],
                mask=(rows[:, None] < N) & (chans[None, :] < C), other=0.0).to(tl.float32)  # fmt: skip
    slot = tl.load(len_ptr + b) - 1
    tl.store(out_ptr + (b * KMAX + slot) * C + chans, tl.sum(w[:, None] * x, axis=0).to(out_ptr.dtype.element_ty),
             mask=chans < C)  # fmt: skip


def adaptive_token_select(
    features: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    plus: bool,
    iqr_k: float = 1.5,
    knn: int = 32,
    grid_div: int = 3,
    grid_end: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features, keys [B, N, C] and scores [B, N] -> tokens [B, Kmax, C], lengths [B], indices [B, Kmax]."""
    batch, n, c = features.shape
    kmax = (n if plus else max_outliers(n)) + 1
    features, scores, keys = features.contiguous(), scores.contiguous(), keys.contiguous()
    indices = torch.full((batch, kmax), PAD, dtype=torch.int64, device=features.device)
    lengths = torch.empty(batch, dtype=torch.int64, device=features.device)
    pruned = torch.empty(batch, n, dtype=torch.int8, device=features.device)
    tokens = torch.zeros(batch, kmax, c, dtype=features.dtype, device=features.device)
    block_n, block_c = triton.next_power_of_2(n), triton.next_power_of_2(c)
    end = n - 1 if grid_end is None else grid_end
    _select[(batch,)](scores, indices, lengths, pruned, n, kmax, iqr_k, grid_div, end,
                      Q1=0.25 * (n - 1), Q3=0.75 * (n - 1), PLUS=plus, BLOCK=block_n)  # fmt: skip
    _merge[(batch, kmax)](features, keys, scores, indices, lengths, tokens, n, c, kmax,
                          KNN=min(knn, n - 1), BLOCK_N=block_n, BLOCK_C=block_c)  # fmt: skip
    _extra[(batch,)](features, scores, pruned, lengths, tokens, n, c, kmax, BLOCK_N=block_n, BLOCK_C=block_c)
    return tokens, lengths, indices
