"""The score a reducer ranks patches by, computed from one vision layer's queries and keys only (the tower itself
keeps its SDPA path): PruMerge's [CLS] row, or the attention each token receives, for CLIP, SigLIP and InternViT
layers."""

from __future__ import annotations

import torch
from torch import nn

QUERY_BLOCK = 256
"""Query rows per step of `received_attention`: its memory is one [B, heads, block, N] slice, not N x N."""


def queries_and_keys(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The query and key projections (after the layer's norm and any q/k norm) of `hidden` [B, N, C], the input of
    a CLIP or SigLIP encoder layer or of an InternViT layer, and its head count."""
    if hasattr(layer, "self_attn"):  # CLIP, SigLIP
        attn, z = layer.self_attn, layer.layer_norm1(hidden)
        return attn.q_proj(z), attn.k_proj(z), attn.num_heads
    attn, z = layer.attention, layer.layernorm_before(hidden)  # InternViT
    return attn.q_norm(attn.q_proj(z)), attn.k_norm(attn.k_proj(z)), attn.num_heads


def cls_row(q_cls: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """PruMerge's score: the [CLS] query [B, 1, C] over all keys [B, N, C] as ONE head of the full width, scale
    C^-0.5, softmaxed; [B, N - 1], the [CLS] key's own weight dropped."""
    logits = (q_cls @ keys.transpose(1, 2))[:, 0] * keys.shape[-1] ** -0.5
    return logits.softmax(-1)[:, 1:]


def received_attention(queries: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N]: the attention each token receives, averaged over heads and queries (the layer's own scale
    head_dim^-0.5), from queries and keys [B, N, C]; computed `QUERY_BLOCK` query rows at a time."""
    q = queries.unflatten(-1, (heads, -1)).transpose(1, 2)
    k = keys.unflatten(-1, (heads, -1)).transpose(1, 2)
    scale = q.shape[-1] ** -0.5
    total = torch.zeros(k.shape[0], k.shape[2], dtype=k.dtype, device=k.device)
    for start in range(0, q.shape[2], QUERY_BLOCK):
        probs = (q[:, :, start : start + QUERY_BLOCK] @ k.transpose(-1, -2) * scale).softmax(-1)
        total += probs.sum(dim=(1, 2))
    return total / (q.shape[1] * q.shape[2])
