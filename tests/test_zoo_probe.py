"""The learnability probe: its candidate question families are well-formed, and a probe trains and scores."""

from __future__ import annotations

import random

import pytest
import torch

from prumerge_cli.zoo.probe import FAMILIES, PROBE_WORDS, Probe, main
from prumerge_cli.zoo.tokenizer import build_tokenizer
from prumerge_cli.zoo.world import POSITIONS, samples_of


def test_every_family_speaks_the_probe_vocabulary():
    tokenizer = build_tokenizer(extra=PROBE_WORDS)
    rng = random.Random(0)
    samples = samples_of("train", 0, 20)
    for name, family in FAMILIES.items():
        for sample in samples:
            qa = family(sample, rng)
            ids = tokenizer(f"{qa.question} {qa.reply}", add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, (name, qa)
    for sample in samples:
        qa = FAMILIES["compare-at-two-step"](sample, rng)
        first, attribute, second, other = qa.steps.split()
        where = {POSITIONS[t.cell]: {t.colour, t.shape, t.size} for t in sample.scene}
        assert attribute in where[first] and other in where[second] and qa.answer in ("yes", "no")


def test_a_probe_trains_and_scores_each_family():
    probe = Probe(["color", "presence"])
    reports = []
    scores = probe.train(2, every=1, images=2, per_family=1, report=lambda step, _: reports.append(step),
                         score_images=4)  # fmt: skip
    assert reports == [1, 2]
    assert set(scores) == {"color", "presence", "presence (steps)"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    with pytest.raises(ValueError, match="unknown families"):
        Probe(["colour"])


def test_a_lesson_probe_trains_on_whole_conversations_and_scores_the_families_named():
    swaps = {"relation": "relation-repeat", "describe": "describe-cells"}
    swapping = Probe(["relation-repeat"], lesson=True, swaps=swaps)
    sample = samples_of("train", 0, 1)[0]
    lesson = swapping.swapped(sample, random.Random(0)).lesson
    kinds = [qa.kind for qa in lesson]
    assert kinds.count("relation-repeat") == 3 and "relation" not in kinds and len(kinds) == len(sample.lesson)
    first = sample.scene[0]
    assert kinds[-1] == "describe-cells" and lesson[-1].answer.split()[:2] == [POSITIONS[first.cell], first.size]
    with pytest.raises(ValueError, match="unknown families"):
        Probe(["relation"], lesson=True, swaps={"relation": "no-such-family"})
    probe = Probe(["relation"], lesson=True)
    pooled, rows, texts, targets = probe.training_batch(0, 2, random.Random(0), per_family=1)
    assert rows.tolist() == [0, 1] and pooled.tokens.shape[:2] == (2, 64)
    for sample, text, target in zip(samples_of("train", 0, 2), texts, targets, strict=True):
        replies = [probe.tokenizer.decode([t for t, y in zip(text, target, strict=True) if y])]
        assert sample.lesson[-1].answer in replies[0] and len(text) == len(target)
        assert sum(t == probe.tokenizer.eos_token_id for t in text) == len(sample.lesson)  # every question of it
    before = [p.detach().clone() for p in probe.model.parameters() if p.requires_grad]
    scores = probe.train(1, every=1, images=2, score_images=4)
    assert set(scores) == {"relation", "relation (steps)"}
    after = [p for p in probe.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_the_probe_command_refuses_unknown_families(capsys):
    assert main(["no-such-family", "--steps", "1"]) == 2
    assert "unknown families" in capsys.readouterr().err
    assert main(["relation", "--lesson", "--swap", "relation"]) == 2
    assert "--swap takes TYPE=FAMILY" in capsys.readouterr().err
    assert main(["relation", "--lesson", "--swap", "colour=relation-at"]) == 2
    assert "unknown question types" in capsys.readouterr().err
