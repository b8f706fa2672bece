"""Token supplement: kNN residual merge into centres and the extra token of pruned patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], idx [B, M] -> [B, M, C]."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def knn_merge(
    features: torch.Tensor,
    keys: torch.Tensor,
    scores: torch.Tensor,
    centre_idx: torch.Tensor,
    knn: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official PruMerge merge, vectorised: each centre i becomes x_i + Σ_{j ∈ kNN(i)} a_j·x_j, where the
    kNN are the `knn` patches (any but i itself) whose L2-normalised keys are most cosine-similar to i's.

    Returns `(merged [B, M, C], neighbours [B, M, knn])`.
    """
    n = features.shape[1]
    knn = min(knn, n - 1)
    unit = F.normalize(keys, dim=-1)
    sim = gather_rows(unit, centre_idx) @ unit.transpose(1, 2)
    sim = sim.scatter(2, centre_idx[..., None], float("-inf"))
    neighbours = torch.topk(sim, knn, dim=-1).indices
    a = scores.to(features.dtype)[:, None, :].expand(-1, centre_idx.shape[1], -1)
    weights = torch.zeros_like(a).scatter_(2, neighbours, torch.gather(a, 2, neighbours))
    merged = gather_rows(features, centre_idx) + weights @ features
    return merged, neighbours


def extra_token(features: torch.Tensor, scores: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """[B, C]: Σ over pruned patches of a_j·x_j (unnormalised, as the official code)."""
    w = torch.where(pruned, scores, torch.zeros_like(scores)).to(features.dtype)
    return (w[:, None, :] @ features)[:, 0]
