"""What the model card reports of a trained LLaVA: held-out accuracy per question type with every token, and
whether the choice of tokens matters (the oracle against a random subset of the same size at about 10% of the
tokens, training-free, original positions), and what the positions setting does to PruMerge and random."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..encoder import ReducedVisionEncoder
from ..lm.llava_lm import LlavaLm
from .oracle import OracleTokens
from .vqa import vqa_accuracy

TOKEN_SHARE = 0.1
"""The share of the visual tokens the oracle and the random subset keep."""


def score_llava(llava_dir: Path, images: int) -> dict[str, Any]:
    """{"vqa": accuracy per type, "questions": n, "token_choice": {...}, "positions": {...}} on the test split."""
    lm = LlavaLm.from_pretrained(llava_dir)
    full = ReducedVisionEncoder.from_pretrained(llava_dir, "none", positions="original")
    everything = vqa_accuracy(full, lm, images=images)
    budget = max(1, round(TOKEN_SHARE * everything.tokens_mean))

    def accuracy(method: str, positions: str, **params: Any) -> float:
        encoder = ReducedVisionEncoder.from_pretrained(llava_dir, method, positions=positions, **params)
        return round(vqa_accuracy(encoder, lm, images=images).accuracy["overall"], 4)

    oracle = vqa_accuracy(OracleTokens(full, budget), lm, images=images).accuracy
    subset = ReducedVisionEncoder.from_pretrained(llava_dir, "random", positions="original", budget=budget)
    random_subset = vqa_accuracy(subset, lm, images=images).accuracy
    positions = {
        "prumerge": {where: accuracy("prumerge", where) for where in ("contiguous", "original")},
        f"random budget={budget}": {"contiguous": accuracy("random", "contiguous", budget=budget),
                                    "original": round(random_subset["overall"], 4)},
    }  # fmt: skip
    return {
        "vqa": {k: round(v, 4) for k, v in everything.accuracy.items()},
        "questions": everything.questions,
        "token_choice": {
            "budget": budget,
            "of": int(everything.tokens_mean),
            "oracle": round(oracle["overall"], 4),
            "random": round(random_subset["overall"], 4),
            "positions": "original",
            "per_type": {
                "oracle": {k: round(v, 4) for k, v in oracle.items()},
                "random": {k: round(v, 4) for k, v in random_subset.items()},
            },
        },
        "positions": positions,
    }
