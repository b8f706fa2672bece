"""The language side of a local LLaVA checkpoint: tokenizer, embeddings, decoder and LM head."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from ..dtypes import torch_dtype
from ..errors import PrumergeError
from ..models.loading import read_config
from .splice import LmBatch


class LlavaLm:
    """Next-token logits for spliced batches of a `LlavaForConditionalGeneration`."""

    def __init__(self, model: LlavaForConditionalGeneration, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.embed = model.get_input_embeddings()
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str = "fp32") -> LlavaLm:
        """Load a LLaVA checkpoint and its tokenizer, offline."""
        if read_config(Path(model_dir)).get("model_type") != "llava":
            raise PrumergeError(f"{model_dir} is not a LLaVA checkpoint")
        model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch_dtype(dtype)).eval()
        return cls(model, AutoTokenizer.from_pretrained(str(model_dir)))

    def hidden(self, batch: LmBatch) -> torch.Tensor:
        """[B, T, H] last hidden states of the decoder over the spliced sequence."""
        return self.model.model.language_model(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).last_hidden_state

    def logits(self, batch: LmBatch) -> torch.Tensor:
        """[B, T, V] logits over the whole spliced sequence."""
        return self.model.lm_head(self.hidden(batch))

    def next_token_logits(self, batch: LmBatch) -> torch.Tensor:
        """[B, V] logits of the token after each row's prompt."""
        return self.model.lm_head(self.hidden(batch)[torch.arange(len(batch.last)), batch.last])

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without specials."""
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def stream(self, batch: LmBatch, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:  # fmt: skip
        """The next token of every row, step by step, with a KV cache: greedy at temperature 0, else sampled
        from the `top_p` nucleus of the tempered distribution (with `generator`)."""
        decoder = self.model.model.language_model
        out = decoder(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, use_cache=True)  # fmt: skip
        rows = torch.arange(len(batch.last), device=batch.last.device)
        token = pick(self.model.lm_head(out.last_hidden_state[rows, batch.last]), temperature, top_p, generator)
        cache, mask, position = out.cache, batch.attention_mask, batch.next_position
        yield token
        for _ in range(max_new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = decoder(inputs_embeds=self.embed(token)[:, None], attention_mask=mask,
                          position_ids=position[:, None], cache=cache, use_cache=True)  # fmt: skip
            token = pick(self.model.lm_head(out.last_hidden_state[:, -1]), temperature, top_p, generator)
            position = position + 1
            yield token

    def greedy(self, batch: LmBatch, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (ids, up to and excluding `</s>`) of every row, with a KV cache."""
        ids = torch.stack(list(self.stream(batch, max_new_tokens)), dim=1).tolist()
        return [self.until_eos(row) for row in ids]

    def until_eos(self, ids: list[int]) -> list[int]:
        """`ids` up to and excluding the first `</s>`."""
        return ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """[B] next tokens from [B, V] logits: arg-max at temperature 0, else a sample from the smallest set of most
    likely tokens whose probability reaches `top_p`."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    ordered, order = probs.sort(-1, descending=True)
    outside = ordered.cumsum(-1) - ordered > top_p  # tokens after the nucleus is full
    ordered = ordered.masked_fill(outside, 0.0)
    choice = torch.multinomial(ordered.cpu(), 1, generator=generator).to(logits.device)
    return order.gather(-1, choice)[:, 0]
