"""`make zoo` in stages: a stage stopped part-way resumes to the very weights of an uninterrupted run, a finished
stage is kept, a changed second phase continues the LLaVA's first, a changed CLIP makes the LLaVA stale, and a CPU
without native bf16 is refused."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from rich.console import Console

from prumerge_cli.zoo.build import Build, Recipe, main, refusal
from prumerge_cli.zoo.precision import native_bf16

TINY = Recipe(clip_steps=3, clip_batch=4, llava_steps=2, focus_steps=1, llava_images=2, precision="fp32",
              retrieval_images=8, vqa_images=4)  # fmt: skip


def build(tmp_path, name: str) -> Build:
    return Build(TINY, tmp_path / name / "zoo", tmp_path / name / "cache", Console(quiet=True))


def test_a_stopped_stage_resumes_to_the_uninterrupted_weights(tmp_path):
    straight = build(tmp_path, "straight")
    assert straight.train("clip", stop_after=None)
    interrupted = build(tmp_path, "interrupted")
    assert not interrupted.train("clip", stop_after=1)
    state = tmp_path / "interrupted" / "cache" / "clip" / "state.pt"
    assert torch.load(state, weights_only=True)["step"] == 1
    assert not (tmp_path / "interrupted" / "zoo" / "clip").exists()  # nothing written before the stage ends
    plan = build(tmp_path, "interrupted")
    assert plan.expected_minutes("clip") == pytest.approx(plan.expected_minutes("clip", fresh=True) * 2 / 3)
    assert not build(tmp_path, "interrupted").train("clip", stop_after=None, deadline=time.perf_counter())
    assert torch.load(state, weights_only=True)["step"] == 2  # past the deadline: one more step, then stopped
    resumed = build(tmp_path, "interrupted")
    assert resumed.train("clip", stop_after=None)
    assert resumed.weights("clip") == straight.weights("clip") and resumed.records["clip"]["precision"] == "fp32"
    assert resumed.up_to_date("clip") and resumed.plan(["clip"]) == []

    assert resumed.train("llava", stop_after=None)
    record = build(tmp_path, "interrupted").records["llava"]
    assert set(record["vqa"]) >= {"color", "presence", "overall"} and record["token_choice"]["budget"] == 26
    assert "| presence |" in (tmp_path / "interrupted" / "zoo" / "MODEL_CARD.md").read_text()
    assert resumed.plan(["clip", "llava"]) == []
    assert build(tmp_path, "interrupted").plan(["llava"]) == []
    refocused = Build(replace(TINY, focus_steps=2), resumed.out, resumed.cache, Console(quiet=True))
    assert refocused.plan(["clip", "llava"]) == ["llava"]  # a new second phase continues the first one's weights
    assert refocused.train("llava", stop_after=None)
    cache = tmp_path / "interrupted" / "cache"
    steps = [torch.load(cache / name / "state.pt", weights_only=True)["step"] for name in ("llava", "llava-focus")]
    assert steps == [2, 2]
    assert set(refocused.records["llava"]["phase_minutes"]) == {"llava", "llava-focus"}
    retrained = Build(replace(TINY, seed=1), resumed.out, resumed.cache, Console(quiet=True))
    assert retrained.plan(["clip", "llava"]) == ["clip", "llava"]  # another recipe: both stale
    assert Recipe().clip()["precision"] == "auto"  # a stage trained in fp32 is not stale where bf16 is native


def test_without_native_bf16_the_full_build_is_refused():
    why = refusal(["clip", "llava", "finetuned"], native=False, force=False, quick=False)
    assert why is not None and "no native bf16" in why and "FORCE=1" in why
    assert refusal(["clip", "llava"], native=True, force=False, quick=False) is None
    assert refusal(["clip"], native=False, force=True, quick=False) is None
    assert refusal(["finetuned"], native=False, force=False, quick=False) is None


@pytest.mark.skipif(native_bf16(), reason="this CPU has native bf16: the build would start")
def test_make_zoo_refuses_in_one_line(capsys, tmp_path):
    assert main(["--out", str(tmp_path / "zoo"), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no native bf16" in err
    assert not (tmp_path / "zoo").exists()


def test_a_time_budget_checkpoints_and_stops(tmp_path):
    args = ["--quick", "--stages", "clip", "--out", str(tmp_path / "zoo"), "--cache", str(tmp_path / "cache")]
    assert main([*args, "--minutes", "0"]) == 0
    assert torch.load(tmp_path / "cache" / "clip" / "state.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "zoo" / "clip").exists()
