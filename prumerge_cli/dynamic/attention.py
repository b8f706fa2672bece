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
    The eps/N term is added only where attention is allowed, so no future token leaks in. This is the definition,
    materialised; training runs it in chunks (`ChunkedPolicyAttention`), whose test compares against it."""
    t = scores.shape[-1]
    eye = torch.eye(t, dtype=scores.dtype, device=scores.device)
    gate = policy[:, None, None, :].to(scores.dtype)
    gate = gate + (1 - gate) * eye
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * gate
    return (weights + allowed * (EPSILON / t)) / (weights.sum(-1, keepdim=True) + EPSILON)


class ChunkedPolicyAttention(torch.autograd.Function):
    """`policy_softmax(q k^T * scale) @ v` in fp32, computed `chunk` query rows at a time. Only q, k, v, the
    policy, the mask and two `[B, H, T]` row statistics are kept for backward, which recomputes each chunk's
    weights; no `[B, H, T, T]` tensor outlives a chunk. Gradients equal those of autograd through
    `policy_softmax`, including the path through the row maximum."""

    @staticmethod
    def forward(ctx, q, k, v, policy, allowed, scale: float, chunk: int):
        out = torch.empty_like(q)
        row_max = q.new_empty(q.shape[:-1])
        row_sum = q.new_empty(q.shape[:-1])
        for lo in range(0, q.shape[2], chunk):
            rows = slice(lo, lo + chunk)
            weights, m, total = _chunk_weights(q, k, policy, allowed, scale, rows)
            out[:, :, rows] = weights @ v
            row_max[:, :, rows], row_sum[:, :, rows] = m, total
        ctx.save_for_backward(q, k, v, policy, allowed, row_max, row_sum)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return ChunkedPolicyAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        q, k, v, policy, allowed, row_max, row_sum = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype)
        scale, t = ctx.scale, k.shape[2]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dpolicy = torch.zeros(policy.shape, dtype=q.dtype, device=q.device)
        for lo in range(0, q.shape[2], ctx.chunk):
            rows = slice(lo, lo + ctx.chunk)
            scores, exps, gate, ok = _chunk_terms(q, k, policy, allowed, scale, rows, row_max[:, :, rows])
            total = row_sum[:, :, rows, None]
            probs = (exps * gate + ok * (EPSILON / t)) / (total + EPSILON)
            d_out = grad_out[:, :, rows]
            dv += probs.transpose(-1, -2) @ d_out
            d_probs = d_out @ v.transpose(-1, -2)
            d_weights = (d_probs - (d_probs * probs).sum(-1, keepdim=True)) / (total + EPSILON)
            d_gate = d_weights * exps
            d_scores = d_weights * exps * gate
            at_max = (scores == row_max[:, :, rows, None]).to(q.dtype)
            d_scores -= at_max * d_scores.sum(-1, keepdim=True) / at_max.sum(-1, keepdim=True)
            off_diagonal = 1 - _diagonal(rows, t, q)
            dpolicy += (d_gate * off_diagonal).sum((1, 2))
            dq[:, :, rows] = (d_scores @ k) * scale
            dk += (d_scores.transpose(-1, -2) @ q[:, :, rows]) * scale
        return dq, dk, dv, dpolicy.to(policy.dtype), None, None, None


def _diagonal(rows: slice, t: int, like: torch.Tensor) -> torch.Tensor:
    """`[C, T]` ones where key j is query row i of the chunk `rows`."""
    ar = torch.arange(t, device=like.device)
    return (ar[rows, None] == ar[None, :]).to(like.dtype)


def _chunk_terms(q, k, policy, allowed, scale, rows, row_max=None):
    """Masked scores, exp(s - max), the gate G and the allowed mask of the query rows `rows`."""
    scores = (q[:, :, rows] @ k.transpose(-1, -2)) * scale
    ok = allowed[:, :, rows]
    scores = scores.masked_fill(~ok, float("-inf"))
    if row_max is None:
        row_max = scores.amax(-1)
    gate = policy[:, None, None, :].to(q.dtype)
    gate = gate + (1 - gate) * _diagonal(rows, k.shape[2], q)
    return scores, torch.exp(scores - row_max[..., None]), gate, ok


def _chunk_weights(q, k, policy, allowed, scale, rows):
    scores, exps, gate, ok = _chunk_terms(q, k, policy, allowed, scale, rows)
    weights = exps * gate
    total = weights.sum(-1)
    probs = (weights + ok * (EPSILON / k.shape[2])) / (total[..., None] + EPSILON)
    return probs, scores.amax(-1), total


def policy_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                     policy: torch.Tensor, scale: float, chunk: int = 128) -> torch.Tensor:  # fmt: skip
    """Attention of the masked form, `[B, H, T, D]` in and out (fp32 inside), in chunks of `chunk` queries."""
    with torch.autocast(query.device.type, enabled=False):
        out = ChunkedPolicyAttention.apply(query.float(), key.float(), value.float(), policy, allowed, scale, chunk)
    return out.to(query.dtype)


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
        out = policy_attention(query, key, value, attention_mask, policy, scaling)
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
