"""The committed embedded models: they load through the user path, are trained, and drive the demo."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from prumerge_cli import ReducedVisionEncoder
from prumerge_cli.lm.llava_lm import LlavaLm
from prumerge_cli.zoo import CLIP_DIR, LLAVA_DIR, MODEL_CARD
from prumerge_cli.zoo.clip_training import retrieval_top1
from prumerge_cli.zoo.vqa import vqa_accuracy

from .cli_helpers import run_cli


def test_zoo_is_small_and_documented():
    files = [f for d in (CLIP_DIR, LLAVA_DIR) for f in d.iterdir()]
    assert {"model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) < 30 * 2**20
    card = MODEL_CARD.read_text()
    assert "## Held-out VQA accuracy" in card and "make zoo" in card


def test_committed_files_hold_no_path_of_the_machine_that_built_them():
    from prumerge_cli.zoo import ZOO_DIR

    for path in ZOO_DIR.rglob("*.json"):
        text = path.read_text()
        assert "absolute_path" not in text and not any(f'"{root}' in text for root in ("/work/", "/root/", "/home/")), (
            path
        )


def test_clip_retrieves_captions():
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(CLIP_DIR)).float().eval()
    assert retrieval_top1(clip, AutoTokenizer.from_pretrained(str(CLIP_DIR)), "test", 64) >= 0.9


@pytest.fixture(scope="module")
def lm():
    return LlavaLm.from_pretrained(LLAVA_DIR)


def test_llava_answers_held_out_questions_above_chance(lm):
    """Trained, though short of the 90% target (see the model card): colour and count are well above chance
    (1/6 and 1/3; measured 92.5% and 85% on these 40 images)."""
    score = vqa_accuracy(ReducedVisionEncoder.from_pretrained(LLAVA_DIR, "none"), lm, images=40)
    assert score.tokens_mean == 256
    assert score.accuracy["color"] >= 0.8 and score.accuracy["count"] >= 0.7, score.accuracy


def test_replies_decoded_by_prefilling_anew_are_the_cached_greedy_ones(lm):
    """`vqa` decodes an answerer's multi-word replies by prefilling each step anew (so that any answerer can);
    for the LM's own logits that must be what its KV-cached greedy decoder says."""
    from prumerge_cli.zoo.vqa import greedy_replies
    from prumerge_cli.zoo.world import samples_of

    samples = samples_of("test", 0, 4)
    image = ReducedVisionEncoder.from_pretrained(LLAVA_DIR, "prumerge").encode_images([s.image for s in samples],
                                                                                       project=True)  # fmt: skip
    questions = lm.encode([s.qas[k].question for s in samples for k in (0, 5)])
    image = image.select(torch.arange(4).repeat_interleave(2))
    with torch.no_grad():
        cached = greedy_replies(lm, image, questions, 4)
        assert greedy_replies(lm, image, questions, 4, answer=lambda batch, _: lm.next_token_logits(batch)) == cached


def test_prumerge_on_the_embedded_model_keeps_few_tokens(lm):
    score = vqa_accuracy(ReducedVisionEncoder.from_pretrained(LLAVA_DIR, "prumerge"), lm, images=25)
    assert score.tokens_max <= 65 and score.tokens_mean < 256 / 3
    assert score.accuracy["overall"] > 0.3


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory):
    """Two fine-tuned bundles of the embedded LLaVA: `prumerge` (2 steps), and `stale`, its copy recording
    other weights (as a bundle does once the LLaVA is retrained)."""
    from rich.console import Console

    from prumerge_cli.finetune.compress import FinetuneJob, run_finetune
    from prumerge_cli.finetune.lora import LoraSettings
    from prumerge_cli.training.loop import TrainOptions
    from prumerge_cli.zoo.llava_json import write_llava_json

    root = tmp_path_factory.mktemp("tuned")
    data = write_llava_json(root / "data", "train", 4)
    options = TrainOptions(steps=2, batch_size=2, lr=1e-3, projector_lr=1e-3, save_every=2)
    job = FinetuneJob(LLAVA_DIR, "prumerge", data, data.parent / "images", root / "ft" / "prumerge", options,
                      LoraSettings(rank=4, alpha=8, dropout=0.0))  # fmt: skip
    run_finetune(job, Console(quiet=True))
    shutil.copytree(root / "ft" / "prumerge", root / "ft" / "stale")
    record = json.loads((root / "ft" / "stale" / "reducer.json").read_text())
    record["model"]["sha256"] = "0" * 64
    for print_ in record["model"]["fingerprints"]:
        print_["head_sha256"] = "0" * 64
    (root / "ft" / "stale" / "reducer.json").write_text(json.dumps(record))
    return root / "ft"


def test_demo_runs_every_method(capsys, tmp_path, tuned_dir):
    """Every method compressed, exported and scored, on --device cpu with nothing created elsewhere."""
    from prumerge_cli.devices import DeviceAudit

    with DeviceAudit() as audit:
        res = run_cli(capsys, "demo", "-o", tmp_path / "demo", "--num-images", "6", "--iters", "1", "--batch-size",
                      "2", "--device", "cpu", "--finetuned", tuned_dir)  # fmt: skip
    assert res.code == 0, res.err
    assert audit.seen == {"cpu"}
    everything = json.loads((tmp_path / "demo" / "demo.json").read_text())
    rows = [r for r in everything if r["regime"] == "training-free"]
    assert [r["method"] for r in rows] == ["none", "prumerge", "prumerge+", "topk", "random", "pool", "oracle"]
    assert rows[-1]["params"] == rows[4]["params"] and rows[-1]["tokens"] == rows[4]["params"]["budget"]
    assert "by question type" in res.out and "Regime: training-free" in res.out
    assert "object-tilted subsets of its visual tokens in training" in " ".join(res.out.split())
    tuned = [r for r in everything if r["regime"] == "fine-tuned"]
    assert [r["method"] for r in tuned] == ["prumerge"] and 0 < tuned[0]["accuracy"] <= 1
    assert "Fine-tuned with the reducer active" in res.out
    assert "Fine-tuned bundle skipped, stale: the weights in" in " ".join(res.out.split())
    assert rows[0]["tokens_ratio"] == 1.0 and rows[0]["torch_ratio"] == 1.0
    budget = rows[3]["params"]["budget"]
    assert budget == max(1, round(rows[1]["tokens"] - 1)) and rows[4]["params"]["budget"] == budget
    assert (tmp_path / "demo" / "onnx" / "prumerge" / "model.onnx").is_file()
    assert (tmp_path / "demo" / "bundles" / "pool" / "reducer.json").is_file()
    assert "accuracy" in res.out


def test_a_retrained_llava_drops_the_bundles_of_the_previous_one(tuned_dir, tmp_path):
    from rich.console import Console

    from prumerge_cli.zoo.finetuned import drop_stale

    shutil.copytree(tuned_dir, tmp_path / "ft")
    drop_stale(tmp_path / "ft", Console(quiet=True))
    assert sorted(p.name for p in (tmp_path / "ft").iterdir()) == ["prumerge"]


def test_a_changed_recipe_makes_a_finetuned_bundle_stale(tuned_dir):
    from prumerge_cli.zoo.finetuned import FinetuneRecipe, up_to_date

    same = FinetuneRecipe(steps=2, batch_size=2, lr=1e-3, projector_lr=1e-3, lora_rank=4, lora_alpha=8,
                          conversations=4)  # fmt: skip
    assert up_to_date(tuned_dir / "prumerge", same) and up_to_date(tuned_dir / "prumerge")
    assert not up_to_date(tuned_dir / "prumerge", replace(same, steps=3))
    assert not up_to_date(tuned_dir / "prumerge", replace(same, lora_rank=8))
    assert not up_to_date(tuned_dir / "stale", same)


def test_the_finetuned_stage_stops_at_checkpoints_and_goes_on_when_rerun(tmp_path):
    from rich.console import Console

    from prumerge_cli.zoo.finetuned import FinetuneRecipe, build_finetuned, up_to_date

    recipe = FinetuneRecipe(steps=4, batch_size=2, lora_rank=4, lora_alpha=8, conversations=4, save_every=2,
                            budget_images=4)  # fmt: skip
    where = {"out": tmp_path / "ft", "cache": tmp_path / "cache"}
    console = Console(quiet=True)
    assert not build_finetuned(recipe, console, deadline=time.perf_counter(), **where)
    assert not (tmp_path / "cache" / "checkpoint-prumerge").exists()
    assert not build_finetuned(recipe, console, stop_after=3, **where)
    assert (tmp_path / "cache" / "checkpoint-prumerge" / "state.pt").is_file() and not (tmp_path / "ft").exists()
    assert build_finetuned(recipe, console, **where)
    built = sorted(p.name for p in (tmp_path / "ft").iterdir())
    assert built == ["pool", "pool-plus", "prumerge", "prumerge+", "random", "random-plus"]
    assert all(up_to_date(p, recipe) for p in (tmp_path / "ft").iterdir())
    assert not (tmp_path / "cache" / "checkpoint-prumerge").exists()


def test_a_deadline_stops_a_finetune_only_right_after_a_checkpoint():
    from prumerge_cli.training.loop import StepLog, TrainOptions
    from prumerge_cli.zoo.finetuned import OutOfTime, stop_at_checkpoint_after

    options = TrainOptions(steps=6, save_every=2)
    assert stop_at_checkpoint_after(None, options) is None
    past, future = stop_at_checkpoint_after(0.0, options), stop_at_checkpoint_after(time.perf_counter() + 1e6, options)
    past(StepLog(0, 1.0, 1.0))  # no checkpoint after step 1
    past(StepLog(5, 1.0, 1.0))  # the last step: the run ends and writes its bundle
    future(StepLog(1, 1.0, 1.0))
    with pytest.raises(OutOfTime, match="checkpointed at step 4"):
        past(StepLog(3, 1.0, 1.0))


def test_the_committed_finetuned_bundles_were_trained_on_the_committed_llava():
    from prumerge_cli import load
    from prumerge_cli.zoo import FINETUNED_DIR

    for bundle in sorted(FINETUNED_DIR.iterdir()) if FINETUNED_DIR.is_dir() else []:
        assert load(bundle, full_hash=True).model_dir.resolve() == LLAVA_DIR.resolve()


def test_the_oracle_keeps_the_patches_covering_the_objects():
    from prumerge_cli.zoo.oracle import box_area, covered_area, oracle_patches
    from prumerge_cli.zoo.world import make_sample, split_seed

    sample = make_sample(split_seed("test", 0))
    area = covered_area(sample, 16, 14)
    covering = set(torch.nonzero(area).flatten().tolist())
    assert 0 < len(covering) < 256 and float(area.sum()) >= sum((x1 - x0) ** 2 for x0, _, x1, _ in sample.boxes) - 1
    few = oracle_patches(sample, 8, 16, 14)
    assert len(few) == 8 and set(few) <= covering and few == sorted(few)
    assert all(box_area(box, 16, 14)[few].sum() > 0 for box in sample.boxes)  # a part of every object
    many = oracle_patches(sample, len(covering) + 10, 16, 14)
    assert covering < set(many) and len(many) == len(covering) + 10  # topped up with background
