"""Order-preserving compaction of a right-padded sequence to the tokens a keep mask selects."""

from __future__ import annotations

import torch


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`keep [B, T]` -> (`index [B, T']`, `valid [B, T']`): the kept positions of each row in their original
    order, right-padded to the longest row (padding points at position 0 and is marked invalid)."""
    _b, t = keep.shape
    counts = keep.sum(1)
    width = max(int(counts.max()), 1)
    ar = torch.arange(t, device=keep.device)
    order = torch.argsort(torch.where(keep, ar, ar + t), dim=1)[:, :width]
    valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    return torch.where(valid, order, 0), valid


def gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`states [B, T, ...]` at `index [B, T']`."""
    shape = (*index.shape, *states.shape[2:])
    flat = index.reshape(*index.shape, *([1] * (states.dim() - 2))).expand(shape)
    return states.gather(1, flat)
