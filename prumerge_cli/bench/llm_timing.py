"""LLM-side cost of visual tokens, measured: prefill latency, KV-cache bytes and one decode step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaModel

from .cost_model import LlmShape


@dataclass
class PrefillCase:
    """One LLM input: embeddings, mask and positions for a batch."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def random_llm(shape: LlmShape, device: torch.device, seed: int = 0) -> LlamaModel:
    """A Llama decoder of `shape` with random weights on `device`, in fp32 (CPU) or fp16 (CUDA)."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, vocab_size=256,
                         max_position_embeddings=4096)  # fmt: skip
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return LlamaModel(config).to(device, dtype).eval()


def synthetic_case(hidden: int, batch: int, visual_tokens: int, text_tokens: int, dtype: torch.dtype,
                   device: torch.device) -> PrefillCase:  # fmt: skip
    """Random embeddings for `visual_tokens` + `text_tokens` positions on `device` (shapes are what matter)."""
    gen = torch.Generator().manual_seed(0)
    length = visual_tokens + text_tokens
    embeds = (torch.randn(batch, length, hidden, generator=gen) * 0.02).to(device, dtype)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    return PrefillCase(embeds, mask, torch.arange(length, device=device).expand(batch, -1))


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes held by a KV cache."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total


def prefill_and_decode(decoder: nn.Module, case: PrefillCase) -> tuple[Callable[[], object], Callable[[], object], int]:
    """Callables timing a prefill and one cached decode step after it, and the KV bytes the prefill leaves."""

    def prefill() -> DynamicCache:
        out = decoder(inputs_embeds=case.inputs_embeds, attention_mask=case.attention_mask,
                      position_ids=case.position_ids, use_cache=True)  # fmt: skip
        return out.cache

    with torch.no_grad():
        cache = prefill()
    size = kv_bytes(cache)
    step = case.inputs_embeds[:, -1:]
    position = case.position_ids[:, -1:] + 1
    mask = torch.cat([case.attention_mask, torch.ones_like(case.attention_mask[:, :1])], dim=1)
    length = cache.get_seq_length()

    def decode() -> None:
        appended = cache.get_seq_length() - length
        if appended:  # the same step each time: drop what the previous call appended
            cache.crop(-appended)
        decoder(inputs_embeds=step, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)

    return prefill, decode, size
