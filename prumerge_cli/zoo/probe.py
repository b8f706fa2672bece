"""A cheap learnability test for question families, before they go into an hour-long `make zoo`: a fresh LM of the
zoo's LLaVA layout, on the committed CLIP's tokens pooled to 8x8, trained on the chosen families only, scored on
held-out images every `--every` steps (the greedy reply scored as `vqa` scores it, and the steps said before the
answer where a family has them).
About 1.3 s per step on 2 AVX2 cores; about 1 s with `--lesson` (8 whole conversations per step).
Usage: python -m prumerge_cli.zoo.probe color,presence [--steps 500] [--every 250] [--seed 0]
       [--lesson [--swap TYPE=FAMILY]]"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from ..cli import quiet_transformers
from ..lm.llava_lm import LlavaLm
from ..lm.splice import IGNORE, splice
from ..models.tower import VisionTower
from ..reducers import ReducedTokens, build_reducer
from . import CLIP_DIR
from .clip_training import image_processor
from .llava_training import build_llava, conversation_batch, qa_tokens
from .stage import warmup_cosine
from .tokenizer import build_tokenizer
from .vqa import answered, greedy_replies
from .world import DESCRIBE, POSITIONS, QA, QUESTION_TYPES, Sample, ask, ask_about, samples_of

PROBE_WORDS = ("larger", "than", "same", "as")
"""Words the candidate families use beyond the world's vocabulary."""


def object_at(sample: Sample, rng: random.Random) -> QA:
    """Position-keyed yes/no, one attribute: is a cell occupied (balanced)."""
    taken = [t.cell for t in sample.scene]
    cell = rng.choice(taken) if rng.random() < 0.5 else rng.choice([c for c in range(9) if c not in taken])
    return QA(f"is there an object at {POSITIONS[cell]}", "yes" if cell in taken else "no", "object-at")


def compare_at(sample: Sample, rng: random.Random) -> QA:
    """Position-keyed relation of two objects (larger, same colour, same shape), balanced where the scene allows."""
    kind = rng.choice(("size", "colour", "shape"))
    holds = {"size": lambda a, b: (a.size, b.size) == ("large", "small"),
             "colour": lambda a, b: a.colour == b.colour, "shape": lambda a, b: a.shape == b.shape}[kind]  # fmt: skip
    pairs = [(a, b) for a in sample.scene for b in sample.scene if a is not b]
    wanted = rng.random() < 0.5
    a, b = rng.choice([p for p in pairs if holds(*p) == wanted] or pairs)
    pa, pb = POSITIONS[a.cell], POSITIONS[b.cell]
    relation = "larger than" if kind == "size" else f"the same {'color' if kind == 'colour' else 'shape'} as"
    return QA(f"is the object at {pa} {relation} the object at {pb}", "yes" if holds(a, b) else "no", "compare-at")


def compare_at_two_step(sample: Sample, rng: random.Random) -> QA:
    """`compare_at`, answered as each position word followed by what is there, then yes or no
    ("west small center large no"): every readout comes right after its own position word."""
    qa = compare_at(sample, rng)
    words = qa.question.split()
    attribute = "size" if "larger" in words else "colour" if "color" in words else "shape"
    cells = [w for w in words if w in POSITIONS]
    there = {POSITIONS[t.cell]: getattr(t, attribute) for t in sample.scene}
    return QA(qa.question, qa.answer, "compare-at-two-step", " ".join(f"{c} {there[c]}" for c in cells))


def relation_at(sample: Sample, rng: random.Random) -> QA:
    """The world's relation with the cell named as a readout question names it ("at west blue"), so that
    the lookup happens in the same words as in "what color is the object at west"."""
    qa = ask(list(sample.scene), "relation", rng)
    return QA(qa.question, qa.answer, "relation-at", f"at {qa.steps}")


def relation_repeat(sample: Sample, rng: random.Random) -> QA:
    """The world's relation with the cell said, then named again as a readout question names it ("west at west
    blue"): the step from the question's cell to its neighbour stays apart from the lookup after "at"."""
    qa = ask(list(sample.scene), "relation", rng)
    return QA(qa.question, qa.answer, "relation-repeat", f"{qa.steps} at {qa.steps}")


def describe_cells(sample: Sample, rng: random.Random) -> QA:
    """The description with each object's cell first ("northwest large red circle and center small blue cross"):
    every object is then read out after a cell the model said itself, as a relation's answer is."""
    things = " and ".join(f"{POSITIONS[t.cell]} {t.size} {t.name}" for t in sample.scene)
    return QA(DESCRIBE, things, "describe-cells")


def colour_of_shape(sample: Sample, rng: random.Random) -> QA:
    """Content-keyed lookup with a one-word readout: the colour of the scene's only object of a shape (else the
    colour at a position)."""
    unique = [t for t in sample.scene if sum(u.shape == t.shape for u in sample.scene) == 1]
    if not unique:
        return ask_about(rng.choice(sample.scene), "color")
    t = rng.choice(unique)
    return QA(f"what color is the {t.shape}", t.colour, "color-of-shape")


Family = Callable[[Sample, random.Random], QA]


def world_family(kind: str) -> Family:
    """One of the world's question types (`world.ask`)."""
    return lambda sample, rng: ask(list(sample.scene), kind, rng)


FAMILIES: dict[str, Family] = {
    **{kind: world_family(kind) for kind in QUESTION_TYPES},
    "object-at": object_at,
    "compare-at": compare_at,
    "compare-at-two-step": compare_at_two_step,
    "color-of-shape": colour_of_shape,
    "relation-at": relation_at,
    "relation-repeat": relation_repeat,
    "describe-cells": describe_cells,
}
SWAPPABLE = (*QUESTION_TYPES, "describe")


class Probe:
    """A fresh LLaVA on the committed CLIP, trained on some families with one question per sequence, or on the
    world's training conversations (`lesson`), where what one question type learns can carry over to another;
    scored on the families, one question per sequence."""

    def __init__(
        self,
        families: list[str],
        seed: int = 0,
        pool_side: int = 8,
        lesson: bool = False,
        swaps: dict[str, str] | None = None,
    ):
        unknown = [f for f in [*families, *(swaps or {}).values()] if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
        types = [t for t in swaps or {} if t not in SWAPPABLE]
        if types:
            raise ValueError(f"unknown question types {types}; choose from {', '.join(SWAPPABLE)}")
        self.families, self.lesson, self.swaps = families, lesson, swaps or {}
        self.tokenizer = build_tokenizer(extra=PROBE_WORDS)
        clip = CLIPModel.from_pretrained(str(CLIP_DIR), dtype=torch.float32).eval()
        self.model = build_llava(clip, self.tokenizer, seed)
        self.lm = LlavaLm(self.model, self.tokenizer)
        self.tower = VisionTower(self.model.model.vision_tower, "clip", feature_layer=-2)
        self.pool = build_reducer("pool", side=pool_side)
        self.processor = image_processor()

    def batch(self, split: str, start: int, count: int, rng: random.Random, per_family: int):
        """Pooled tokens of `count` images and their questions (`per_family` of each family per image)."""
        samples = samples_of(split, start, count)
        pixels = self.processor(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pooled = self.pool(self.tower(pixels, with_scores=False))
        asked = [(i, FAMILIES[f](s, rng)) for i, s in enumerate(samples) for f in self.families
                 for _ in range(per_family)]  # fmt: skip
        return pooled, torch.tensor([i for i, _ in asked]), [qa for _, qa in asked]

    def training_batch(self, step: int, images: int, rng: random.Random, per_family: int):
        """Pooled tokens, the image row of each sequence, and the sequences' ids and targets: questions of the
        families, or one training conversation per image (`lesson`)."""
        if not self.lesson:
            pooled, rows, qas = self.batch("train", step * images, images, rng, per_family)
            texts, targets = zip(*(qa_tokens(self.tokenizer, qa) for qa in qas), strict=True)
            return pooled, rows, list(texts), list(targets)
        samples = [self.swapped(s, rng) for s in samples_of("train", step * images, images)]
        pixels, texts, targets = conversation_batch(samples, self.processor, self.tokenizer)
        with torch.no_grad():
            pooled = self.pool(self.tower(pixels, with_scores=False))
        return pooled, torch.arange(images), texts, targets

    def swapped(self, sample: Sample, rng: random.Random) -> Sample:
        """The sample whose training conversation asks, for each question of a swapped type, one of its family."""
        swaps = self.swaps
        return replace(
            sample, lesson=tuple(FAMILIES[swaps[q.kind]](sample, rng) if q.kind in swaps else q for q in sample.lesson)
        )

    def image_tokens(self, pooled: ReducedTokens, rows: torch.Tensor) -> ReducedTokens:
        """The projected pooled tokens of each question's image."""
        projected = self.model.model.multi_modal_projector(pooled.tokens[rows])
        return ReducedTokens(projected, pooled.lengths[rows], pooled.indices[rows])

    def train(self, steps: int, every: int, images: int = 8, per_family: int = 4, lr: float = 1.5e-3,
              report: Callable[[int, dict[str, float]], None] | None = None,
              score_images: int = 300) -> dict[str, float]:  # fmt: skip
        """`steps` of AdamW under warmup-cosine; held-out scores (`score_images`) every `every` steps and at the
        end."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        sched = warmup_cosine(opt, steps)
        rng = random.Random(0)
        scores: dict[str, float] = {}
        for step in range(steps):
            self.model.train()
            pooled, rows, texts, targets = self.training_batch(step, images, rng, per_family)
            batch = splice(self.lm.embed, self.lm.bos_id, self.image_tokens(pooled, rows), texts, targets)
            loss = F.cross_entropy(self.lm.logits(batch).flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if (step + 1) % every == 0 or step + 1 == steps:
                scores = self.score(score_images, min(50, score_images))
                if report is not None:
                    report(step + 1, scores)
        return scores

    @torch.no_grad()
    def score(self, images: int = 300, batch_images: int = 50) -> dict[str, float]:
        """Held-out accuracy per family: of the answer, as `vqa` scores it, and of the steps said before it."""
        self.model.eval()
        rng = random.Random(1)
        correct: dict[str, list[bool]] = defaultdict(list)
        for start in range(0, images, batch_images):
            pooled, rows, qas = self.batch("test", start, min(batch_images, images - start), rng, 1)
            replies = self.lm.encode([qa.reply for qa in qas])
            said = greedy_replies(self.lm, self.image_tokens(pooled, rows), self.lm.encode([qa.question for qa in qas]),
                                  max(map(len, replies)) + 1)  # fmt: skip
            for qa, reply, got in zip(qas, replies, said, strict=True):
                answer = self.lm.encode([qa.answer])[0]
                correct[qa.kind].append(answered(got, answer))
                if qa.steps:
                    steps = reply[: len(reply) - len(answer)]
                    correct[f"{qa.kind} (steps)"].append(got[: len(steps)] == steps)
        return {kind: sum(c) / len(c) for kind, c in sorted(correct.items())}


def main(argv: list[str] | None = None) -> int:
    """Train a probe on the families named and print its held-out scores as it goes."""
    parser = argparse.ArgumentParser(prog="python -m prumerge_cli.zoo.probe", description=__doc__.split("\n")[0])
    parser.add_argument("families", help=f"comma-separated, of: {', '.join(FAMILIES)}")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--swap",
        action="append",
        default=[],
        metavar="TYPE=FAMILY",
        help="with --lesson: ask the family's questions instead of the type's (e.g. relation=relation-at)",
    )
    parser.add_argument(
        "--lesson",
        action="store_true",
        help="train on the world's training conversations (every type), score the families named",
    )
    args = parser.parse_args(argv)
    quiet_transformers()
    torch.manual_seed(args.seed)
    try:
        swaps = dict(swap.split("=", 1) for swap in args.swap if "=" in swap)
        if len(swaps) != len(args.swap):
            raise ValueError("--swap takes TYPE=FAMILY")
        probe = Probe(args.families.split(","), args.seed, lesson=args.lesson, swaps=swaps)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    probe.train(args.steps, args.every, report=lambda step, scores: print(
        f"step {step}: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()), flush=True))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
