"""Padded per-image rows -> rows packed one image after another, on the device and without reading anything back
to the host (so it can run inside a TensorRT enqueue and under CUDA-graph capture)."""

from __future__ import annotations

import torch


def pack_rows(tokens: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor):
    """tokens [B, K, C], indices [B, K], lengths [B] -> (tokens [B * K, C], indices [B * K], count []): the first
    `count = lengths.sum()` rows are image 0's valid rows, then image 1's, ...; the padding rows follow them."""
    kmax = indices.shape[1]
    slot = torch.arange(kmax, device=indices.device)
    valid = (slot[None, :] < lengths[:, None]).flatten()
    starts = torch.cumsum(lengths, 0) - lengths
    count = lengths.sum()
    padding_rank = torch.cumsum((~valid).long(), 0) - 1
    dest = torch.where(valid, (starts[:, None] + slot[None, :]).flatten(), count + padding_rank)
    packed_tokens = torch.empty_like(tokens.flatten(0, 1)).index_copy_(0, dest, tokens.flatten(0, 1))
    packed_indices = torch.empty_like(indices.flatten()).index_copy_(0, dest, indices.flatten())
    return packed_tokens, packed_indices, count
