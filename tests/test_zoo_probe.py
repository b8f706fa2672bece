"""The learnability probe: its candidate question families are well-formed, and a probe trains and scores."""

from __future__ import annotations

import random

import pytest

from prumerge_cli.zoo.probe import FAMILIES, PROBE_WORDS, Probe, main
from prumerge_cli.zoo.tokenizer import build_tokenizer
from prumerge_cli.zoo.world import POSITIONS, samples_of


def test_every_family_speaks_the_probe_vocabulary_and_presence_at_is_balanced_and_true():
    tokenizer = build_tokenizer(extra=PROBE_WORDS)
    rng = random.Random(0)
    samples = samples_of("train", 0, 100)
    for name, family in FAMILIES.items():
        for sample in samples[:20]:
            qa = family(sample, rng)
            ids = tokenizer(f"{qa.question} {qa.answer}", add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, (name, qa)
    answers = []
    for sample in samples:
        qa = FAMILIES["presence-at"](sample, rng)
        *_, colour, shape, _, cell = qa.question.split()
        there = {(t.colour, t.shape) for t in sample.scene if POSITIONS[t.cell] == cell}
        assert (qa.answer == "yes") == ((colour, shape) in there), qa
        answers.append(qa.answer)
    assert 35 <= answers.count("yes") <= 65
    two_step = FAMILIES["presence-at-two-step"](samples[0], rng)
    assert len(two_step.answer.split()) in (2, 3) and two_step.answer.split()[-1] in ("yes", "no")
    for sample in samples[:20]:
        first, attribute, second, other, verdict = FAMILIES["compare-at-two-step"](sample, rng).answer.split()
        where = {POSITIONS[t.cell]: {t.colour, t.shape, t.size} for t in sample.scene}
        assert attribute in where[first] and other in where[second] and verdict in ("yes", "no")


def test_a_probe_trains_and_scores_each_family():
    probe = Probe(["color", "presence-at-two-step"])
    reports = []
    scores = probe.train(2, every=1, images=2, per_family=1, report=lambda step, _: reports.append(step),
                         score_images=4)  # fmt: skip
    assert reports == [1, 2]
    assert set(scores) == {"color", "presence-at-two-step", "presence-at-two-step (first word)"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    with pytest.raises(ValueError, match="unknown families"):
        Probe(["colour"])


def test_the_probe_command_refuses_unknown_families(capsys):
    assert main(["no-such-family", "--steps", "1"]) == 2
    assert "unknown families" in capsys.readouterr().err
