"""Pack per-row centre selections into padded `ReducedTokens`."""

from __future__ import annotations

import torch

from .base import EXTRA_INDEX, PAD_INDEX, ReducedTokens, TowerSignals
from .merge import extra_token, gather_rows, knn_merge


def trim(centre_idx: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that no row uses (eager mode; one host read of the largest count)."""
    width = int(valid.sum(-1).max()) if valid.numel() else 0
    return centre_idx[:, :width], valid[:, :width]


def assemble(
    signals: TowerSignals,
    centre_idx: torch.Tensor,
    valid: torch.Tensor,
    merge: bool,
    knn: int,
) -> ReducedTokens:
    """Build the output: centres (kNN-merged if `merge`) left-aligned, then, if `merge`, the extra token."""
    x = signals.features
    batch, n, _ = x.shape
    counts = valid.sum(-1)
    pad = torch.full_like(centre_idx, PAD_INDEX)
    indices = torch.where(valid, centre_idx, pad)
    if not merge:
        tokens = gather_rows(x, centre_idx) * valid[..., None].to(x.dtype)
        return ReducedTokens(tokens, counts, indices)

    assert signals.scores is not None and signals.keys is not None
    merged, neighbours = knn_merge(x, signals.keys, signals.scores, centre_idx, knn)
    centre_mask = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
    centre_mask.scatter_(1, centre_idx, valid)
    extra = extra_token(x, signals.scores, ~centre_mask)

    slot = counts[:, None]
    zeros = x.new_zeros(batch, 1, x.shape[-1])
    tokens = torch.cat([merged * valid[..., None].to(x.dtype), zeros], dim=1)
    tokens = tokens.scatter(1, slot[..., None].expand(-1, -1, x.shape[-1]), extra[:, None])
    indices = torch.cat([indices, indices.new_full((batch, 1), PAD_INDEX)], dim=1)
    indices = indices.scatter(1, slot, EXTRA_INDEX)
    no_nb = torch.full((batch, 1, neighbours.shape[-1]), -1, dtype=torch.long, device=x.device)
    neighbours = torch.cat([torch.where(valid[..., None], neighbours, -1), no_nb], dim=1)
    return ReducedTokens(tokens, counts + 1, indices, neighbours)
