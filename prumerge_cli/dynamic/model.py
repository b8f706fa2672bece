"""`DynamicLlava`: a Hugging Face `LlavaForConditionalGeneration` (Llama-family LM) driven layer by layer so
that the predictors run between decoder layers `l-1` and `l`: image top-k at prefill, output-token KV
dropping while decoding, and the masked form used in training. The stock decoder layers do all the work;
only the loop around them (rotary positions, masks, compaction) is ours."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from ..errors import PrumergeError
from ..lm.llava_lm import LlavaLm
from ..lm.splice import LmBatch, splice
from ..reducers import ReducedTokens
from .attention import causal_mask, dynamic_attention_on
from .cache import PagedKVCache, SparseKVCache
from .compaction import compact, gather_tokens
from .config import SparseConfig
from .predictors import Predictors, keep_decision, keep_score

KVCache = PagedKVCache | SparseKVCache

CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"
"""What a decoder layer calls its KV cache: `past_key_values` until transformers 5.2x renamed it."""

IMAGE_START = 1
"""Spliced rows are `<s> image text`: the image span starts at position 1."""


@dataclass
class Prefill:
    """What a prefill returns: next-token logits, the kept-token mask over the input, the layer-`l` states."""

    logits: torch.Tensor
    keep: torch.Tensor
    states: torch.Tensor


@dataclass
class GumbelNoise:
    """Gumbel(0, 1) draws `[B, N, 2]` for the image span and `[B, T, 2]` for the whole sequence."""

    image: torch.Tensor
    text: torch.Tensor


def hard_gumbel_keep(logits: torch.Tensor, tau: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Hard Gumbel-softmax sample of channel 0 (keep) with the straight-through gradient, in fp32;
    `F.gumbel_softmax(hard=True)` with the Gumbel draws given (or drawn here from the global generator)."""
    logits = logits.float()
    if noise is None:
        noise = -torch.empty_like(logits).exponential_().log()
    soft = ((logits + noise.to(logits.device)) / tau).softmax(-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return (hard - soft.detach() + soft)[..., 0]


@dataclass
class TrainForward:
    """Logits of the masked form and the sampled masks (1 = keep) with where they apply."""

    logits: torch.Tensor
    image_mask: torch.Tensor | None
    image_logits: torch.Tensor | None
    output_mask: torch.Tensor
    output_sparse: torch.Tensor


@dataclass
class Generation:
    """Generated ids per row (fixed length), the keep decision of every generated token that was fed back
    (all but the last), and the tokens whose K/V are held per row below (`dense`) and from (`sparse`) the
    sparse layer once the last token has been fed."""

    tokens: torch.Tensor
    kept: torch.Tensor
    dense: torch.Tensor
    sparse: torch.Tensor
    allocated_bytes: int | None = None

    def texts(self, eos_id: int) -> list[list[int]]:
        """Ids per row up to and excluding the first `</s>`."""
        rows = self.tokens.tolist()
        return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


class DynamicLlava:
    """Predictors attached at decoder layer `config.sparse_layer` of a LLaVA's Llama LM.

    `vision=False` leaves the image span alone (e.g. tokens already reduced by PruMerge); `output=False`
    keeps every generated token."""

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        tokenizer,
        predictors: Predictors,
        vision: bool = True,
        output: bool = True,
    ):
        self.lm = LlavaLm(model, tokenizer)
        self.decoder = model.model.language_model
        self.predictors = predictors
        self.config: SparseConfig = predictors.config
        self.vision = vision
        self.output = output
        layers = len(self.decoder.layers)
        if not 0 < self.config.sparse_layer < layers:
            raise PrumergeError(f"sparse_layer {self.config.sparse_layer} must be in 1..{layers - 1} for this LM")

    @property
    def layer(self) -> int:
        """The decoder layer whose input feeds the predictors."""
        return self.config.sparse_layer

    def _run(self, h: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, upper: bool,
             cache: KVCache | None = None, policy: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Decoder layers below (`upper=False`) or from (`upper=True`) the sparse layer."""
        rotary = self.decoder.rotary_emb(h, positions)
        layers = self.decoder.layers[self.layer :] if upper else self.decoder.layers[: self.layer]
        extra = {CACHE_ARGUMENT: cache} if policy is None else {"policy": policy, CACHE_ARGUMENT: cache}
        with dynamic_attention_on(self.decoder.config):
            for layer in layers:
                h = layer(h, attention_mask=mask, position_embeddings=rotary, **extra)
        return self.decoder.norm(h) if upper else h

    def _image_span(self, image_lengths: torch.Tensor) -> int:
        n = int(image_lengths[0])
        if bool((image_lengths != n).any()):
            raise PrumergeError("the vision predictor needs the same number of image tokens in every row")
        return n

    def image_keep(self, states: torch.Tensor, image_lengths: torch.Tensor, image_start: int = IMAGE_START
                   ) -> torch.Tensor:  # fmt: skip
        """`[B, T]` mask: the top-k image tokens (from `image_start`) by keep score (k = floor(rate * N)),
        everything else True."""
        keep = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        if not self.vision:
            return keep
        n = self._image_span(image_lengths)
        scores = keep_score(self.predictors.vision(states[:, image_start : image_start + n]))
        top = scores.topk(self.config.vision_keep(n), dim=1).indices
        keep[:, image_start : image_start + n] = False
        return keep.scatter(1, top + image_start, True)

    def output_keep(self, states: torch.Tensor) -> torch.Tensor:
        """`[B, T]` inference decision of the output predictor for every position."""
        if not self.output:
            return torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        return keep_decision(self.predictors.text(states))

    def prefill(self, batch: LmBatch, image_lengths: torch.Tensor, cache: KVCache | None = None,
                generated_from: torch.Tensor | None = None, image_start: int = IMAGE_START) -> Prefill:  # fmt: skip
        """Run a spliced batch (its image from `image_start`) with the image top-k and, for positions >=
        `generated_from[b]` except each row's last, the output predictor's drops (no-cache decoding). Fills an
        empty `cache` if given."""
        valid = batch.attention_mask.bool()
        states = self._run(batch.inputs_embeds, batch.position_ids, causal_mask(valid), False, cache)
        keep = valid & self.image_keep(states, image_lengths, image_start)
        if generated_from is not None:
            ar = torch.arange(keep.shape[1], device=keep.device)[None, :]
            older = (ar >= generated_from[:, None]) & (ar < batch.last[:, None])
            keep &= ~older | self.output_keep(states)
        index, kept = compact(keep)
        positions = batch.position_ids.gather(1, index)
        hidden = self._run(gather_tokens(states, index), positions, causal_mask(kept), True, cache)
        last = kept.sum(1) - 1
        logits = self.lm.model.lm_head(hidden[torch.arange(len(last), device=last.device), last])
        if cache is not None:
            cache.commit(valid.sum(1), kept.sum(1))
        return Prefill(logits, keep, states)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Feed one token per row at `positions [B]` (default: the dense counter, i.e. contiguous positions):
        (next-token logits `[B, V]`, keep decision of the fed token `[B]`). Its K/V is written at each group's
        counter; the sparse counter advances only if it is kept."""
        h = self.lm.embed(tokens)[:, None]
        positions = (cache.dense if positions is None else positions)[:, None]
        states = self._run(h, positions, cache.decode_mask(False), False, cache)
        keep = self.output_keep(states)[:, 0]
        hidden = self._run(states, positions, cache.decode_mask(True), True, cache)
        cache.commit(torch.ones_like(keep), keep)
        return self.lm.model.lm_head(hidden[:, 0]), keep

    @property
    def head_dim(self) -> int:
        """Width of one attention head of the LM."""
        cfg = self.decoder.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def dropped_image_tokens(self, image_tokens: int) -> int:
        """Image tokens the prefill top-k removes from the layers from `l` on (0 without the predictor)."""
        return image_tokens - self.config.vision_keep(image_tokens) if self.vision else 0

    def empty_cache(self, batch: int, dense_slots: int, sparse_slots: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> SparseKVCache:  # fmt: skip
        """Static buffers for `batch` rows: `dense_slots` below the sparse layer, `sparse_slots` from it on."""
        cfg = self.decoder.config
        return SparseKVCache(batch, len(self.decoder.layers), self.layer, cfg.num_key_value_heads, self.head_dim,
                             dense_slots, sparse_slots, dtype, device)  # fmt: skip

    def new_cache(self, batch: LmBatch) -> PagedKVCache:
        """An empty paged cache for the rows of `batch`, in its dtype and on its device."""
        cfg = self.decoder.config
        return PagedKVCache(len(batch.last), len(self.decoder.layers), self.layer, cfg.num_key_value_heads,
                            self.head_dim, batch.inputs_embeds.dtype, batch.inputs_embeds.device)  # fmt: skip

    @torch.no_grad()
    def generate(self, image: ReducedTokens, texts: list[list[int]], max_new_tokens: int, use_cache: bool = True,
                 prefix: list[int] | None = None) -> Generation:  # fmt: skip
        """Greedy decoding of `max_new_tokens` per row after `<s> prefix image text` (image tokens projected;
        `prefix`: a chat template's tokens before the image, the same for every row)."""
        if use_cache:
            return self._generate_cached(image, texts, max_new_tokens, prefix or [])
        return self._generate_uncached(image, texts, max_new_tokens, prefix or [])

    def stream(self, image: ReducedTokens, texts: list[list[int]], max_new_tokens: int, cache_out: list | None = None,
               prefix: list[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:  # fmt: skip
        """Greedy tokens step by step with the sparse KV cache: (next token [B], the previous token's keep
        decision [B] or None for the first); `cache_out` receives the cache."""
        prefix = prefix or []
        batch = splice(self.lm.embed, self.lm.bos_id, image, texts, prefixes=[prefix] * len(texts))
        cache = self.new_cache(batch)
        if cache_out is not None:
            cache_out.append(cache)
        token = self.prefill(batch, image.lengths, cache, image_start=IMAGE_START + len(prefix)).logits.argmax(-1)
        yield token, None
        for step in range(max_new_tokens - 1):
            logits, keep = self.decode_step(token, cache, batch.next_position + step)
            token = logits.argmax(-1)
            yield token, keep

    def _generate_cached(self, image: ReducedTokens, texts: list[list[int]], max_new_tokens: int,
                         prefix: list[int]) -> Generation:  # fmt: skip
        caches: list = []
        steps = list(self.stream(image, texts, max_new_tokens, caches, prefix))
        tokens, kept = [t for t, _ in steps], [k for _, k in steps[1:]]
        cache = caches[0]
        return Generation(torch.stack(tokens, 1), _stack(kept, len(texts)), cache.dense.clone(), cache.sparse.clone(),
                          cache.allocated_bytes())  # fmt: skip

    def _generate_uncached(self, image: ReducedTokens, texts: list[list[int]], max_new_tokens: int,
                           prefix: list[int]) -> Generation:  # fmt: skip
        generated: list[list[int]] = [[] for _ in texts]
        device = image.lengths.device
        image_start = IMAGE_START + len(prefix)
        start = image.lengths + torch.tensor([len(t) for t in texts], device=device) + image_start
        for _ in range(max_new_tokens):
            rows = [t + g for t, g in zip(texts, generated, strict=True)]
            batch = splice(self.lm.embed, self.lm.bos_id, image, rows, prefixes=[prefix] * len(texts))
            out = self.prefill(batch, image.lengths, generated_from=start, image_start=image_start)
            for row, token in zip(generated, out.logits.argmax(-1).tolist(), strict=True):
                row.append(token)
        ar = torch.arange(out.keep.shape[1], device=device)[None, :]
        fed = (ar >= start[:, None]) & (ar <= batch.last[:, None])
        decisions = self.output_keep(out.states)[fed].view(len(texts), -1)
        sparse = out.keep.sum(1) - 1 + decisions[:, -1].long()  # the newest token's own decision commits it
        return Generation(torch.tensor(generated, device=device), decisions, batch.last + 1, sparse)

    def kv_bytes(self, dense: torch.Tensor, sparse: torch.Tensor, dtype: torch.dtype = torch.float16) -> int:
        """Bytes of the keys and values held for `dense[b]` tokens in each layer below the sparse layer and
        `sparse[b]` from it on, at `dtype`."""
        per_token = 2 * self.decoder.config.num_key_value_heads * self.head_dim * torch.finfo(dtype).bits // 8
        upper = len(self.decoder.layers) - self.layer
        return int(self.layer * dense.sum() + upper * sparse.sum()) * per_token

    def train_forward(self, batch: LmBatch, image_lengths: torch.Tensor, answers: torch.Tensor, tau: float,
                      image_start: int = IMAGE_START, noise: GumbelNoise | None = None) -> TrainForward:  # fmt: skip
        """The masked form on the whole sequence: hard Gumbel-softmax masks (straight-through) for the image
        span (from `image_start`) and for the `answers [B, T]` span of rows whose answer is at least LEN^OT
        long; masked softmax in every layer from `l` on. Nothing is removed, so every label keeps its loss.
        `noise` fixes the Gumbel draws (drawn from the global generator otherwise)."""
        valid = batch.attention_mask.bool()
        mask = causal_mask(valid)
        states = self._run(batch.inputs_embeds, batch.position_ids, mask, False)
        policy = torch.ones(states.shape[:2], dtype=states.dtype, device=states.device)
        image_mask = image_logits = None
        if self.vision:
            span = slice(image_start, image_start + self._image_span(image_lengths))
            image_logits = self.predictors.vision(states[:, span])
            image_mask = hard_gumbel_keep(image_logits, tau, None if noise is None else noise.image)
            policy = torch.cat([policy[:, : span.start], image_mask.to(policy.dtype), policy[:, span.stop :]], 1)
        output_sparse = answers & (answers.sum(1, keepdim=True) >= self.config.output_len_for_training)
        output_mask = torch.ones_like(policy)
        if self.output and bool(output_sparse.any()):
            text_logits = self.predictors.text(states)
            output_mask = hard_gumbel_keep(text_logits, tau, None if noise is None else noise.text)
            policy = torch.where(output_sparse, output_mask.to(policy.dtype), policy)
        hidden = self._run(states, batch.position_ids, mask, True, policy=policy)
        return TrainForward(self.lm.model.lm_head(hidden), image_mask, image_logits, output_mask, output_sparse)

    @torch.no_grad()
    def masked_hidden(self, batch: LmBatch, keep: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the masked form with a hard `keep [B, T]` policy (the reference the
        compacted prefill must match on kept tokens)."""
        valid = batch.attention_mask.bool()
        mask = causal_mask(valid)
        states = self._run(batch.inputs_embeds, batch.position_ids, mask, False)
        return self._run(states, batch.position_ids, mask, True, policy=keep.to(states.dtype))

    @torch.no_grad()
    def compacted_hidden(self, batch: LmBatch, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final hidden states of the compacted form for a given `keep`: (hidden, index, valid)."""
        valid = batch.attention_mask.bool()
        states = self._run(batch.inputs_embeds, batch.position_ids, causal_mask(valid), False)
        index, kept = compact(keep & valid)
        hidden = self._run(gather_tokens(states, index), batch.position_ids.gather(1, index), causal_mask(kept), True)
        return hidden, index, kept


def _stack(decisions: list[torch.Tensor], rows: int) -> torch.Tensor:
    return torch.stack(decisions, 1) if decisions else torch.zeros(rows, 0, dtype=torch.bool)
