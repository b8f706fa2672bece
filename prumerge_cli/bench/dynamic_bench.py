"""Bench of a model with learned predictors (a dynamic bundle) against the same model keeping every token:
prefill, one decode step after a generation, KV-cache bytes, and fidelity (KL, greedy agreement, accuracy)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..dynamic.bundle import load_dynamic
from ..dynamic.cache import BLOCK_TOKENS, PagedKVCache
from ..dynamic.model import DynamicLlava
from ..encoder import ReducedVisionEncoder
from ..lm.splice import LmBatch, splice
from ..progress import Phases
from ..reducers import ReducedTokens, build_reducer
from . import cost_model
from .timing import interleaved

if TYPE_CHECKING:
    from .runner import BenchSettings


def generation_state(model: DynamicLlava, image: ReducedTokens, texts: list[list[int]], new_tokens: int):
    """Prefill and feed `new_tokens - 1` greedy tokens; returns (batch, cache, next token, tokens fed)."""
    batch = splice(model.lm.embed, model.lm.bos_id, image, texts)
    cache = model.new_cache(batch)
    token = model.prefill(batch, image.lengths, cache).logits.argmax(-1)
    for _ in range(new_tokens - 1):
        token = model.decode_step(token, cache)[0].argmax(-1)
    return batch, cache, token


def repeatable_step(model: DynamicLlava, cache: PagedKVCache, token: torch.Tensor) -> Callable[[], None]:
    """One decode step at the cache's state, undone afterwards (the next call overwrites the same slots)."""

    def step() -> None:
        dense, sparse = cache.dense.clone(), cache.sparse.clone()
        model.decode_step(token, cache)
        cache.dense.copy_(dense)
        cache.sparse.copy_(sparse)

    return step


def dynamic_rows(bundle: Path, pixels: torch.Tensor, settings: BenchSettings, phases: Phases) -> list[dict[str, Any]]:
    """One row per batch size: the bundle's model vs the same model with every token kept."""
    dynamic, encoder = load_dynamic(bundle, model_dir=settings.model, full_hash=settings.full_hash)
    dense = DynamicLlava(dynamic.lm.model, dynamic.lm.tokenizer, dynamic.predictors, vision=False, output=False)
    full = ReducedVisionEncoder(encoder.model, build_reducer("none"), encoder.model_dir)
    full.projector = encoder.projector
    text = dynamic.lm.encode(settings.prompts[:1])[0]
    with torch.no_grad():
        accuracy = embedded_accuracy(dynamic, dense, encoder, full, settings.vqa_images, phases)
        rows = []
        for batch in settings.batch_sizes:
            rounds = settings.warmup + settings.iters
            with phases.phase(f"dynamic: generating and timing at batch {batch}", rounds) as advance:
                rows.append(batch_row(dynamic, dense, full, encoder, pixels, text, batch, settings, accuracy, advance))
    return rows


def batch_row(dynamic: DynamicLlava, dense: DynamicLlava, full: ReducedVisionEncoder, encoder: ReducedVisionEncoder,
              pixels: torch.Tensor, text: list[int], batch: int, settings: BenchSettings, accuracy: dict[str, float],
              advance: Callable[[], None]) -> dict[str, Any]:  # fmt: skip
    """The figures of one batch size: both models generate, then their prefill and decode step are timed
    interleaved (`advance` after each round)."""
    new_tokens = settings.dynamic_tokens
    px = pixels[torch.arange(batch) % len(pixels)]
    images = {"dense": full(px, project=True), "dynamic": encoder(px, project=True)}
    models = {"dense": dense, "dynamic": dynamic}
    outs = {k: models[k].generate(images[k], [text] * batch, new_tokens) for k in models}
    fns = {}
    for k, model in models.items():
        b, cache, token = generation_state(model, images[k], [text] * batch, new_tokens)
        fns[f"{k}/prefill"] = lambda m=model, b=b, i=images[k]: m.prefill(b, i.lengths)
        fns[f"{k}/decode"] = repeatable_step(model, cache, token)
    times = interleaved(fns, iters=settings.iters, warmup=settings.warmup, on_round=advance)
    first = {k: models[k].prefill(_batch(models[k], images[k], text, batch), images[k].lengths).logits
             for k in models}  # fmt: skip
    figures = row(dynamic, outs, times, first, images, batch, new_tokens, accuracy)
    if settings.llm_shape is not None:
        figures["kv_projection"] = kv_projection(dynamic, settings.llm_shape, figures["output_tokens_kept"], new_tokens)
    return figures


def _batch(model: DynamicLlava, image: ReducedTokens, text: list[int], batch: int) -> LmBatch:
    return splice(model.lm.embed, model.lm.bos_id, image, [text] * batch)


def row(dynamic: DynamicLlava, outs, times, first, images, batch: int, new_tokens: int, accuracy) -> dict[str, Any]:
    """The figures of one batch size."""
    kv = {k: o.allocated_bytes for k, o in outs.items()}
    stored = {k: {"dense_layers": float(o.dense.float().mean()), "sparse_layers": float(o.sparse.float().mean())}
              for k, o in outs.items()}  # fmt: skip
    eos = dynamic.lm.eos_id
    same = [a == b for a, b in zip(outs["dynamic"].texts(eos), outs["dense"].texts(eos), strict=True)]
    kl = F.kl_div(first["dynamic"].float().log_softmax(-1), first["dense"].float().log_softmax(-1), log_target=True,
                  reduction="none").sum(-1)  # fmt: skip
    kept = outs["dynamic"].kept
    ms = {k: 1000 * v.p50 for k, v in times.items()}
    return {
        "batch": batch, "new_tokens": new_tokens,
        "image_tokens": {"dense": float(images["dense"].lengths.float().mean()),
                         "dynamic": image_tokens_seen(dynamic, images["dynamic"])},
        "output_tokens_kept": float(kept.float().mean()) if kept.numel() else 1.0,
        "prefill_ms": {"dense": ms["dense/prefill"], "dynamic": ms["dynamic/prefill"],
                       "ratio": ms["dynamic/prefill"] / ms["dense/prefill"]},
        "decode_step_ms": {"dense": ms["dense/decode"], "dynamic": ms["dynamic/decode"],
                           "ratio": ms["dynamic/decode"] / ms["dense/decode"]},
        "kv_cache_bytes": {"dense": kv["dense"], "dynamic": kv["dynamic"], "ratio": kv["dynamic"] / kv["dense"],
                           "measured": "allocated by the paged cache after the generation"},
        "kv_tokens_per_sample": stored,
        "fidelity": {"next_token_kl": float(kl.mean()), "greedy_agreement": sum(same) / len(same), **accuracy},
    }  # fmt: skip


def kv_projection(dynamic: DynamicLlava, llm_shape: str, output_kept: float, new_tokens: int) -> dict[str, Any]:
    """The same keep decisions on a named LLM shape (LLaVA-1.5: 576 image tokens), from the cost model."""
    name, _ = cost_model.shape_named(llm_shape)
    shape = cost_model.SHAPES[name]  # every layer of the named model, whatever `:layers=` the timing used
    figures = cost_model.dynamic_kv_projection(shape, dynamic.layer, dynamic.config.vision_keep_rate, output_kept,
                                               new_tokens, BLOCK_TOKENS)  # fmt: skip
    return {"llm": name, "sparse_layer": dynamic.layer, **figures, "measured": "cost model, paged blocks"}


def image_tokens_seen(dynamic: DynamicLlava, image: ReducedTokens) -> float:
    """Mean image tokens the layers from `l` on see: the prefill top-k, or what the reducer kept."""
    if dynamic.vision:
        return float(dynamic.config.vision_keep(int(image.lengths[0])))
    return float(image.lengths.float().mean())


def embedded_accuracy(dynamic, dense, encoder, full, images: int, phases: Phases) -> dict[str, float]:
    """Held-out VQA accuracy of both when the model is the embedded LLaVA."""
    from ..zoo import LLAVA_DIR
    from ..zoo.vqa import vqa_accuracy

    if images < 1 or encoder.model_dir.resolve() != LLAVA_DIR.resolve():
        return {}
    scores = {}
    for name, model, enc in (("dense", dense, full), ("dynamic", dynamic, encoder)):
        with phases.phase(f"dynamic: held-out accuracy of the {name} model, {images} images", images) as advance:
            score = vqa_accuracy(enc, model.lm, images=images, progress=advance,
                                 answer=lambda b, image, m=model: m.prefill(b, image.lengths).logits)  # fmt: skip
        scores[f"vqa_accuracy_{name}"] = score.accuracy["overall"]
    return scores
