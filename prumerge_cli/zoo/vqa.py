"""Held-out VQA accuracy of a LLaVA fed by any reducer, per question type: the greedy reply, scored by whether it
ends with the answer (a reply may say its steps first, see `world.QA`)."""

from __future__ import annotations

import math
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
    per_image_accuracy: list[float] = field(repr=False, default_factory=list)
    """The share of each image's questions answered: the unit of `ci95`."""

    @property
    def ci95(self) -> float:
        """Half-width of the 95% confidence interval of the overall accuracy, images as the unit (the normal
        approximation over per-image accuracies: an image's questions are not independent of each other)."""
        n = len(self.per_image_accuracy)
        if n < 2:
            return float("nan")
        mean = sum(self.per_image_accuracy) / n
        variance = sum((a - mean) ** 2 for a in self.per_image_accuracy) / (n - 1)
        return 1.96 * math.sqrt(variance / n)


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
    progress: Callable[[int], None] | None = None,
) -> VqaScore:
    """Ask every question type about the first `images` samples of `split`; `answer` replaces the LM's own
    next-token logits (e.g. a model with learned predictors); `progress` is told the images each batch scored."""
    correct: dict[str, list[bool]] = defaultdict(list)
    by_image: dict[int, list[bool]] = defaultdict(list)
    tokens: list[int] = []
    for start in range(0, images, batch_images):
        samples = samples_of(split, start, min(batch_images, images - start))
        if isinstance(encoder, ReducedVisionEncoder):
            out = encoder.encode_images([s.image for s in samples], project=True)
        else:
            out = encoder(samples)
        tokens += out.lengths.tolist()
        asked = [(i, qa) for i, s in enumerate(samples) for qa in s.qas]
        wanted = lm.encode([qa.answer for _, qa in asked])
        longest = max(len(r) for r in lm.encode([qa.reply for _, qa in asked]))
        for one_word, steps in ((True, 1), (False, longest + 1)):  # one-word replies need no decoding after it
            rows = [j for j, (_, qa) in enumerate(asked) if (len(qa.reply.split()) == 1) == one_word]
            if not rows:
                continue
            image = out.select(torch.tensor([asked[j][0] for j in rows]))
            said = greedy_replies(lm, image, lm.encode([asked[j][1].question for j in rows]), steps, answer)
            for j, reply in zip(rows, said, strict=True):
                correct[asked[j][1].kind].append(answered(reply, wanted[j]))
                by_image[start + asked[j][0]].append(correct[asked[j][1].kind][-1])
        if progress is not None:
            progress(len(samples))
    accuracy = {kind: sum(correct[kind]) / len(correct[kind]) for kind in QUESTION_TYPES}
    everything = [c for kind in QUESTION_TYPES for c in correct[kind]]
    accuracy["overall"] = sum(everything) / len(everything)
    per_image = [sum(by_image[i]) / len(by_image[i]) for i in sorted(by_image)]
    return VqaScore(accuracy, sum(tokens) / len(tokens), min(tokens), max(tokens), len(everything), tokens, per_image)


def answered(reply: list[int], answer: list[int]) -> bool:
    """Whether a reply (ids) ends with the answer's ids: the scoring rule of every question type."""
    return reply[-len(answer) :] == answer


def greedy_replies(lm: LlavaLm, image: ReducedTokens, questions: list[list[int]], steps: int,
                   answer: Answerer | None = None) -> list[list[int]]:  # fmt: skip
    """Up to `steps` greedy tokens after each question, cut before `</s>`: the LM's own, with its KV cache; or
    `answer`'s (next-token logits of a spliced batch), prefilling anew at each step."""
    if answer is None:
        return lm.greedy(splice(lm.embed, lm.bos_id, image, questions), steps)
    said: list[list[int]] = [[] for _ in questions]
    for _ in range(steps):
        batch = splice(lm.embed, lm.bos_id, image, [q + s for q, s in zip(questions, said, strict=True)])
        for reply, token in zip(said, answer(batch, image).argmax(-1).tolist(), strict=True):
            reply.append(token)
    return [lm.until_eos(reply) for reply in said]
