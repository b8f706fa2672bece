"""Held-out VQA accuracy of a LLaVA fed by any reducer: greedy first answer token, per question type."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..encoder import ReducedVisionEncoder
from ..lm.llava_lm import LlavaLm
from ..lm.splice import LmBatch, splice
from ..reducers import ReducedTokens
from .world import QUESTION_TYPES, Sample, samples_of


@dataclass
class VqaScore:
    """Accuracy per question type and overall, and the visual tokens the LLM saw."""

    accuracy: dict[str, float]
    tokens_mean: float
    tokens_min: int
    tokens_max: int
    questions: int
    per_image_tokens: list[int] = field(repr=False, default_factory=list)


Answerer = Callable[[LmBatch, ReducedTokens], torch.Tensor]
"""Next-token logits `[B, V]` for a spliced batch and the image tokens in it."""
TokenSource = ReducedVisionEncoder | Callable[[list[Sample]], ReducedTokens]
"""An encoder, or any map from samples to their projected image tokens (e.g. `oracle.OracleTokens`)."""


@torch.no_grad()
def vqa_accuracy(
    encoder: TokenSource,
    lm: LlavaLm,
    split: str = "test",
    images: int = 200,
    batch_images: int = 20,
    answer: Answerer | None = None,
) -> VqaScore:
    """Ask every question type about the first `images` samples of `split`; `answer` replaces the LM's own
    next-token logits (e.g. a model with learned predictors)."""
    correct: dict[str, list[bool]] = defaultdict(list)
    tokens: list[int] = []
    for start in range(0, images, batch_images):
        samples = samples_of(split, start, min(batch_images, images - start))
        if isinstance(encoder, ReducedVisionEncoder):
            out = encoder.encode_images([s.image for s in samples], project=True)
        else:
            out = encoder(samples)
        tokens += out.lengths.tolist()
        rows = torch.tensor([i for i, s in enumerate(samples) for _ in s.qas])
        qas = [qa for s in samples for qa in s.qas]
        image = ReducedTokens(out.tokens[rows], out.lengths[rows], out.indices[rows], span=out.span)
        batch = splice(lm.embed, lm.bos_id, image, lm.encode([qa.question for qa in qas]))
        logits = lm.next_token_logits(batch) if answer is None else answer(batch, image)
        predicted = logits.argmax(-1).tolist()
        for qa, guess in zip(qas, predicted, strict=True):
            correct[qa.kind].append(guess == lm.encode([qa.answer])[0][0])
    accuracy = {kind: sum(correct[kind]) / len(correct[kind]) for kind in QUESTION_TYPES}
    everything = [c for kind in QUESTION_TYPES for c in correct[kind]]
    accuracy["overall"] = sum(everything) / len(everything)
    return VqaScore(accuracy, sum(tokens) / len(tokens), min(tokens), max(tokens), len(everything), tokens)
