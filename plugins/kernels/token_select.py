"""AdaptiveTokenSelect: PruMerge / PruMerge+ selection and merge as one Triton kernel, padded to Kmax.

Same contract as the `prumerge` / `prumerge+` reducers in export mode (`Reducer.for_export`): outputs
tokens [B, Kmax, C], lengths [B] and indices [B, Kmax] (-1 extra token, -2 padding). Kept patches are ranked
by descending score with ties broken by the lower index; the PyTorch reference is the reducer itself.

One program per image, one pass: the selection (IQR fence from the sorted scores, ranks, the PruMerge+ raster
grid) is computed once, then the output slots are produced BLOCK_K at a time up to the image's own count:

1. similarities of the tile's centres to every patch, `keys[centres] @ keys.T`, a `tl.dot` GEMM over
   channel chunks (tensor cores for fp16; fp32 stays IEEE unless `input_precision` says "tf32"); the key norms
   are accumulated from the same loads in the first tile, so every key is read once per tile;
2. the `knn` most cosine-similar patches of each centre by repeated row-wise arg-max over that tile;
3. a weight matrix W [BLOCK_K, N] (1 on the centre, the score on each neighbour; for the extra token the
   score of every pruned patch) and the tokens as one more GEMM, `W @ features`.

Slots past the image's count are padding: zeros, index -2. Nothing is written to scratch memory and there is
one launch, so the same kernel serves the JIT plugin and, compiled to PTX, the AOT one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..shapes import select_kmax

BLOCK_K = 16  # output slots per step (tl.dot's smallest M)
CHUNK = 8  # rows of the rank loop; channels per GEMM step are CHUNK_C
CHUNK_C = 16
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
def _key_norms(keys_row, rows, N, C, BLOCK_N: tl.constexpr, CHUNK_C: tl.constexpr):
    """[BLOCK_N] L2 norms of the keys (at least 1e-12, as F.normalize)."""
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, CHUNK_C):
        chans = c0 + tl.arange(0, CHUNK_C)
        k = tl.load(keys_row + rows[:, None] * C + chans[None, :], mask=(rows[:, None] < N) & (chans[None, :] < C),
                    other=0.0).to(tl.float32)  # fmt: skip
        sq += tl.sum(k * k, axis=1)
    return tl.maximum(tl.sqrt(sq), 1e-12)


@triton.jit
def _tile(x_row, keys_row, tokens_row, idx_row, s, slot, total, norms, start, rows, N, C, KMAX, KNN: tl.constexpr,
          PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_C: tl.constexpr):  # fmt: skip
    """Output slots start .. start + BLOCK_K - 1: kNN-merged centres, the extra token, padding."""
    j = start + tl.arange(0, BLOCK_K)
    is_centre = j < total
    centre = tl.sum(tl.where(slot[None, :] == j[:, None], rows[None, :], 0), axis=1)
    dots = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, CHUNK_C):  # similarities of the centres' keys to every key: a GEMM over channel chunks
        chans = c0 + tl.arange(0, CHUNK_C)
        every = tl.load(keys_row + rows[:, None] * C + chans[None, :], mask=(rows[:, None] < N) & (chans[None, :] < C),
                        other=0.0)  # fmt: skip
        mine = tl.load(keys_row + centre[:, None] * C + chans[None, :], mask=chans[None, :] < C, other=0.0)
        dots = tl.dot(mine, tl.trans(every), dots, input_precision=PRECISION)
    centre_norm = tl.sum(tl.where(rows[None, :] == centre[:, None], norms[None, :], 0.0), axis=1)
    candidate = (rows < N)[None, :] & (rows[None, :] != centre[:, None]) & is_centre[:, None]
    sims = tl.where(candidate, dots / (norms[None, :] * centre_norm[:, None]), float("-inf"))
    for _ in range(KNN):  # a chosen neighbour's similarity becomes -inf (the lowest index among equals)
        top = tl.max(sims, axis=1)
        best = tl.min(tl.where(sims == top[:, None], rows[None, :], BLOCK_N), axis=1)
        sims = tl.where(rows[None, :] == best[:, None], float("-inf"), sims)
    candidate = (rows < N)[None, :] & (rows[None, :] != centre[:, None]) & is_centre[:, None]
    weights = tl.where(candidate & (sims == float("-inf")), s[None, :], 0.0)
    weights = tl.where((rows[None, :] == centre[:, None]) & is_centre[:, None], 1.0, weights)
    weights = tl.where((j == total)[:, None] & (slot < 0)[None, :] & (rows < N)[None, :], s[None, :], weights)
    w = weights.to(x_row.dtype.element_ty)
    for c0 in range(0, C, CHUNK_C):  # the tokens: W @ features
        chans = c0 + tl.arange(0, CHUNK_C)
        x = tl.load(x_row + rows[:, None] * C + chans[None, :], mask=(rows[:, None] < N) & (chans[None, :] < C),
                    other=0.0)  # fmt: skip
        out = tl.dot(w, x, input_precision=PRECISION)
        tl.store(tokens_row + j[:, None] * C + chans[None, :], out.to(tokens_row.dtype.element_ty),
                 mask=(j[:, None] < KMAX) & (chans[None, :] < C))  # fmt: skip
    index = tl.where(is_centre, centre, tl.where(j == total, -1, -2)).to(tl.int64)
    tl.store(idx_row + j, index, mask=j < KMAX)


@triton.jit
def adaptive_token_select_kernel(
    x_ptr, scores_ptr, keys_ptr, N, C, KMAX, grid_end, tokens_ptr, len_ptr, idx_ptr,
    IQR_K: tl.constexpr, GRID_DIV: tl.constexpr, Q1: tl.constexpr, Q3: tl.constexpr, PLUS: tl.constexpr,
    KNN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr, CHUNK_C: tl.constexpr,
):  # fmt: skip
    """Grid (B,). Parameters are ordered inputs, scalars, outputs: the launch convention of TensorRT's AOT
    plugins."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    scores_row, keys_row, x_row = scores_ptr + b * N, keys_ptr + b * N * C, x_ptr + b * N * C
    tokens_row, idx_row = tokens_ptr + b * KMAX * C, idx_ptr + b * KMAX
    s = tl.load(scores_row + rows, mask=rows < N, other=float("inf")).to(tl.float32)
    slot, total = _slots(scores_row, s, rows, N, grid_end, IQR_K, GRID_DIV, Q1, Q3, PLUS, BLOCK_N, CHUNK)
    tl.store(len_ptr + b, (total + 1).to(tl.int64))
    s = tl.where(rows < N, s, 0.0)
    norms = _key_norms(keys_row, rows, N, C, BLOCK_N, CHUNK_C)
    end = tl.cdiv(total + 1, BLOCK_K) * BLOCK_K
    for start in range(0, end, BLOCK_K):
        _tile(x_row, keys_row, tokens_row, idx_row, s, slot, total, norms, start, rows, N, C, KMAX, KNN, PRECISION,
              BLOCK_K, BLOCK_N, CHUNK_C)  # fmt: skip
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
    return {"IQR_K": iqr_k, "GRID_DIV": grid_div, "Q1": 0.25 * (n - 1), "Q3": 0.75 * (n - 1), "PLUS": plus,
            "KNN": min(knn, n - 1), "PRECISION": precision, "BLOCK_N": max(triton.next_power_of_2(n), 16),
            "BLOCK_K": BLOCK_K, "CHUNK": CHUNK, "CHUNK_C": CHUNK_C}  # fmt: skip


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
        **select_constants(n, c, plus, iqr_k, knn, grid_div, input_precision), num_warps=NUM_WARPS,
    )  # fmt: skip
    return tokens, lengths, indices
