"""Vectorised selection primitives: IQR outliers, PruMerge+ grid, merge-centre ordering."""

from __future__ import annotations

import torch


def linear_quantile(sorted_rows: torch.Tensor, q: float) -> torch.Tensor:
    """[B] quantile q of each ascending row, linear interpolation (as numpy's default and torch.quantile)."""
    pos = q * (sorted_rows.shape[-1] - 1)
    lo = int(pos)
    hi = min(lo + 1, sorted_rows.shape[-1] - 1)
    return sorted_rows[:, lo] + (pos - lo) * (sorted_rows[:, hi] - sorted_rows[:, lo])


def iqr_outlier_mask(scores: torch.Tensor, iqr_k: float) -> torch.Tensor:
    """[B, N] bool: scores strictly above Q3 + iqr_k·IQR of their own row (linear quantiles, in fp32)."""
    a = scores.float()
    ordered = torch.sort(a, dim=-1).values
    q1, q3 = linear_quantile(ordered, 0.25), linear_quantile(ordered, 0.75)
    return a > (q3 + iqr_k * (q3 - q1))[:, None]


def max_outliers(num_patches: int) -> int:
    """Most values that can lie strictly above the upper quartile of `num_patches` values (144 for 576)."""
    return num_patches - 1 - (3 * (num_patches - 1)) // 4


def grid_stride(counts: torch.Tensor, num_patches: int, grid_div: int) -> torch.Tensor:
    """PruMerge+ raster stride per row: (N // k) // grid_div, at least 1.

    Positive integers divide exactly as floor(float division) (IEEE division is correctly rounded), which
    exports without the sign handling of integer floor-division that TensorRT rejects."""
    per_outlier = torch.floor(num_patches / counts.clamp(min=1).float())
    return torch.floor(per_outlier / grid_div).long().clamp(min=1)


def grid_mask(counts: torch.Tensor, num_patches: int, grid_div: int, grid_end: int) -> torch.Tensor:
    """[B, N] bool: PruMerge+ spatial samples arange(0, grid_end, stride_b); empty rows where k_b = 0."""
    j = torch.arange(num_patches, device=counts.device)
    stride = grid_stride(counts, num_patches, grid_div)
    on_grid = (j[None, :] % stride[:, None] == 0) & (j[None, :] < grid_end)
    return on_grid & (counts[:, None] > 0)


def order_centres(
    scores: torch.Tensor,
    counts: torch.Tensor,
    cap: int,
    extra_mask: torch.Tensor | None = None,
    raster: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge centres per row, left-aligned: the top-`counts[b]` patches by descending score, then the
    patches of `extra_mask` not already kept, ascending (or every centre in raster order if `raster`).

    `cap` is a static upper bound on `counts`. Returns `(centre_idx [B, M], valid [B, M])` with
    M = cap, or N when `extra_mask` is given; invalid slots hold arbitrary non-centre patch indices.
    """
    batch, n = scores.shape
    j = torch.arange(n, device=scores.device)
    top = torch.topk(scores, cap, dim=-1, sorted=True).indices
    rank = torch.arange(cap, device=scores.device).expand(batch, cap)
    not_centre = (2 * n + j).expand(batch, n)  # unique keys, so the sort below needs no stability
    key = not_centre.scatter(1, top, torch.where(rank < counts[:, None], rank, torch.gather(not_centre, 1, top)))
    centre_mask = key < 2 * n
    if extra_mask is not None:
        key = torch.where(extra_mask & ~centre_mask, n + j, key)
        centre_mask = key < 2 * n
    if raster:
        key = torch.where(centre_mask, j, not_centre)
    width = cap if extra_mask is None else n
    centre_idx = torch.topk(key, width, dim=-1, largest=False, sorted=True).indices
    valid = torch.arange(width, device=scores.device) < centre_mask.sum(-1, keepdim=True)
    return centre_idx, valid
