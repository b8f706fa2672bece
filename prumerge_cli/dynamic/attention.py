"""Attention for the dynamic decoder loop, registered in transformers' attention interface so that the
stock `LlamaAttention` calls it: plain SDPA under a boolean mask, or, while training, the official masked
softmax whose key policy passes the straight-through gradient to the predictors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PretrainedConfig

NAME = "prumerge_dynamic"
EPSILON = 1e-6


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def policy_softmax(scores: torch.Tensor, allowed: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Masked softmax of Dynamic-LLaVA: `exp(s - max) * G / (sum + eps)` with G_ij = g_j + (1 - g_j) [i == j].

    `scores [B, H, T, T]`, `allowed [B, 1, T, T]` (causal and padding), `policy [B, T]` in {0, 1} (differentiable).
    The eps/N term is added only where attention is allowed, so no future token leaks in."""
    t = scores.shape[-1]
    eye = torch.eye(t, dtype=scores.dtype, device=scores.device)
    gate = policy[:, None, None, :].to(scores.dtype)
    gate = gate + (1 - gate) * eye
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * gate
    return (weights + allowed * (EPSILON / t)) / (weights.sum(-1, keepdim=True) + EPSILON)


def dynamic_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    policy: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """`attention_mask`: boolean `[B, 1, Tq, Tk]`, True = may attend. Returns `[B, Tq, H, D]`."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if policy is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    else:
        scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
        out = (policy_softmax(scores, attention_mask, policy) @ value.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, dynamic_attention)


@contextmanager
def dynamic_attention_on(config: PretrainedConfig, name: str = NAME) -> Iterator[None]:
    """Route the LM's attention layers to the registered attention function `name` for the block."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """`[B, 1, T, T]` causal mask over a right-padded sequence; every token may always see itself."""
    t = valid.shape[1]
    ar = torch.arange(t, device=valid.device)
    allowed = (ar[None, :] <= ar[:, None])[None] & valid[:, None, :]
    return (allowed | torch.eye(t, dtype=torch.bool, device=valid.device))[:, None]
