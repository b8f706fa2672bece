"""AdaptiveTokenSelect: PruMerge / PruMerge+ selection and merge as one Triton kernel, padded to Kmax.

Same contract as the `prumerge` / `prumerge+` reducers in export mode (`Reducer.for_export`): outputs
tokens [B, Kmax, C], lengths [B] and indices [B, Kmax] (-1 extra token, -2 padding). Kept patches are ranked
by descending score with ties broken by the lower index; the PyTorch reference is the reducer itself.

One launch, grid (B, SPLIT): every program recomputes its image's selection (the IQR fence from a sorted row,
ranks, the raster grid by cumulative sum; cheap next to merging) and fills the output slots p, p + SPLIT, ...:
a centre merged with its k nearest keys by cosine similarity (repeated arg-max, residual sum), the
score-weighted sum of the pruned patches after the last centre, then padding. No program waits for another
and no scratch memory is needed, so the same kernel serves the JIT plugin and, compiled to PTX, the AOT one.
Loops over CHUNK rows or channels keep every 2-D tile at [BLOCK_N, CHUNK]: at ViT-L's 576 patches of width 1024
the PTX uses no local memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..shapes import select_kmax

SPLIT = 32  # programs per image
CHUNK = 16  # rows or channels per step of the loops that keep 2-D tiles small ([BLOCK_N, CHUNK])


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
    """Output slot of every patch (-1: pruned) and the number of selected patches."""
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
    if PLUS:
        per = tl.maximum(N // tl.maximum(count, 1), 1)
        stride = tl.maximum(per // GRID_DIV, 1)
        grid = real & (rows % stride == 0) & (rows < grid_end) & (~kept) & (count > 0)
        order = tl.cumsum(grid.to(tl.int32), axis=0) - 1
        slot = tl.where(grid, count + order, slot)
        total = count + tl.sum(grid.to(tl.int32), axis=0)
    return slot, total


@triton.jit
def _dots(keys_row, centre, rows, N, C, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, C_BLOCKS: tl.constexpr):
    """Dot products of every key with key `centre` (`centre` < 0: with itself, i.e. squared norms)."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c_block in range(C_BLOCKS):
        chans = c_block * CHUNK + tl.arange(0, CHUNK)
        k = tl.load(keys_row + rows[:, None] * C + chans[None, :], mask=(rows[:, None] < N) & (chans[None, :] < C),
                    other=0.0).to(tl.float32)  # fmt: skip
        if centre < 0:
            acc += tl.sum(k * k, axis=1)
        else:
            mine = tl.load(keys_row + centre * C + chans, mask=chans < C, other=0.0).to(tl.float32)
            acc += tl.sum(k * mine[None, :], axis=1)
    return acc


@triton.jit
def adaptive_token_select_kernel(
    x_ptr, scores_ptr, keys_ptr, N, C, KMAX, grid_end, SPLIT, tokens_ptr, len_ptr, idx_ptr,
    IQR_K: tl.constexpr, GRID_DIV: tl.constexpr, Q1: tl.constexpr, Q3: tl.constexpr, PLUS: tl.constexpr,
    KNN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    rows = tl.arange(0, BLOCK_N)
    chans = tl.arange(0, BLOCK_C)
    real = rows < N
    scores_row, keys_row, x_row = scores_ptr + b * N, keys_ptr + b * N * C, x_ptr + b * N * C
    s = tl.load(scores_row + rows, mask=real, other=float("inf")).to(tl.float32)
    slot, total = _slots(scores_row, s, rows, N, grid_end, IQR_K, GRID_DIV, Q1, Q3, PLUS, BLOCK_N, CHUNK)
    if tl.program_id(1) == 0:
        tl.store(len_ptr + b, (total + 1).to(tl.int64))
    c_blocks: tl.constexpr = BLOCK_C // CHUNK
    norms = tl.maximum(tl.sqrt(_dots(keys_row, -1, rows, N, C, BLOCK_N, CHUNK, c_blocks)), 1e-12)
    for j in range(tl.program_id(1), KMAX, SPLIT):
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        index = tl.full([], -2, tl.int64)
        if j < total:  # a centre plus its KNN most similar keys (cosine), weighted by their scores
            centre = tl.sum(tl.where(slot == j, rows, 0), axis=0)
            centre_norm = tl.sum(tl.where(rows == centre, norms, 0.0), axis=0)
            sims = _dots(keys_row, centre, rows, N, C, BLOCK_N, CHUNK, c_blocks) / (norms * centre_norm)
            sims = tl.where(real & (rows != centre), sims, float("-inf"))
            acc += tl.load(x_row + centre * C + chans, mask=chans < C, other=0.0).to(tl.float32)
            for _ in range(KNN):
                best = tl.argmax(sims, axis=0)
                weight = tl.load(scores_row + best).to(tl.float32)
                acc += weight * tl.load(x_row + best * C + chans, mask=chans < C, other=0.0).to(tl.float32)
                sims = tl.where(rows == best, float("-inf"), sims)
            index = centre.to(tl.int64)
        elif j == total:  # the extra token: the score-weighted sum of the pruned patches, CHUNK rows at a time
            for start in range(0, BLOCK_N, CHUNK):
                part = start + tl.arange(0, CHUNK)
                w = tl.sum(tl.where((rows[:, None] == part[None, :]) & (slot < 0)[:, None], s[:, None], 0.0), axis=0)
                x = tl.load(x_row + part[:, None] * C + chans[None, :], mask=(part[:, None] < N) & (chans[None, :] < C),
                            other=0.0).to(tl.float32)  # fmt: skip
                acc += tl.sum(tl.where(part < N, w, 0.0)[:, None] * x, axis=0)
            index = tl.full([], -1, tl.int64)
        tl.store(tokens_ptr + (b * KMAX + j) * C + chans, acc.to(tokens_ptr.dtype.element_ty), mask=chans < C)
        tl.store(idx_ptr + b * KMAX + j, index)


def select_constants(n: int, c: int, plus: bool, iqr_k: float, knn: int, grid_div: int) -> dict[str, object]:
    """The kernel's compile-time constants for `n` patches of width `c`."""
    return {"IQR_K": iqr_k, "GRID_DIV": grid_div, "Q1": 0.25 * (n - 1), "Q3": 0.75 * (n - 1), "PLUS": plus,
            "KNN": min(knn, n - 1), "BLOCK_N": triton.next_power_of_2(n),
            "BLOCK_C": max(triton.next_power_of_2(c), CHUNK), "CHUNK": CHUNK}  # fmt: skip


def adaptive_token_select(
    features: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    plus: bool,
    iqr_k: float = 1.5,
    knn: int = 32,
    grid_div: int = 3,
    grid_end: int | None = None,
    split: int = SPLIT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features, keys [B, N, C] and scores [B, N] -> tokens [B, Kmax, C], lengths [B], indices [B, Kmax];
    `split` programs per image share its output slots."""
    batch, n, c = features.shape
    kmax = select_kmax(n, plus)
    features, scores, keys = features.contiguous(), scores.contiguous(), keys.contiguous()
    tokens = torch.empty(batch, kmax, c, dtype=features.dtype, device=features.device)
    lengths = torch.empty(batch, dtype=torch.int64, device=features.device)
    indices = torch.empty(batch, kmax, dtype=torch.int64, device=features.device)
    split = min(kmax, split)
    end = n - 1 if grid_end is None else grid_end
    adaptive_token_select_kernel[(batch, split)](
        features, scores, keys, n, c, kmax, end, split, tokens, lengths, indices,
        **select_constants(n, c, plus, iqr_k, knn, grid_div),
    )  # fmt: skip
    return tokens, lengths, indices
