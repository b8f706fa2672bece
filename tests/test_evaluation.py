"""lmms-eval on the embedded world: the `prumerge` model scores the local `prumerge_world` tasks end to end for a
training-free, a fine-tuned and a predictor bundle, each score equal to the project's own VQA scoring of the same
questions; `--baseline` gives the ratios; the entry point serves `python -m lmms_eval`; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prumerge_cli.bundle import load
from prumerge_cli.dynamic.bundle import load_dynamic, write_dynamic_bundle
from prumerge_cli.finetune.bundle import load_finetuned_lm
from prumerge_cli.lm.llava_lm import LlavaLm
from prumerge_cli.zoo import FINETUNED_DIR, LLAVA_DIR
from prumerge_cli.zoo.vqa import vqa_accuracy
from prumerge_cli.zoo.world import QUESTION_TYPES

from .cli_helpers import run_cli
from .test_cli import assert_clean_error
from .test_dynamic import mixed_predictors

pytest.importorskip("lmms_eval")

IMAGES = 10


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """World tasks and Hugging Face files under a temporary cache, shared by the module's tests."""
    root = tmp_path_factory.getbasetemp() / "prumerge-cache"
    monkeypatch.setenv("PRUMERGE_CACHE", str(root))
    monkeypatch.setenv("HF_HOME", str(root / "huggingface"))
    return root


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Name -> (bundle, the project's own score of its first IMAGES test images)."""
    root = tmp_path_factory.mktemp("bundles")
    lm = LlavaLm.from_pretrained(LLAVA_DIR)
    from prumerge_cli.encoder import ReducedVisionEncoder

    ReducedVisionEncoder.from_pretrained(LLAVA_DIR, "prumerge").save(root / "prumerge")
    predictors = mixed_predictors(lm.model.config.text_config.hidden_size, seed=4)
    state = {f"predictors.{k}": v.contiguous() for k, v in predictors.state_dict().items()}
    write_dynamic_bundle(root / "dynamic", LLAVA_DIR, predictors.config, "predictor", state, ["predictors"], [],
                         force=False)  # fmt: skip
    dynamic, encoder = load_dynamic(root / "dynamic")
    finetuned = FINETUNED_DIR / "prumerge"
    return {
        "training-free": (root / "prumerge", vqa_accuracy(load(root / "prumerge"), lm, images=IMAGES)),
        "fine-tuned": (finetuned, vqa_accuracy(load(finetuned), load_finetuned_lm(finetuned), images=IMAGES)),
        "predictor": (root / "dynamic", vqa_accuracy(encoder, dynamic.lm, images=IMAGES,
                                                     answer=lambda b, image: dynamic.prefill(b, image.lengths).logits)),
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["training-free", "fine-tuned", "predictor"])
def test_world_tasks_through_lmms_eval_score_as_the_project_does(capsys, bundles, kind, tmp_path):
    bundle, expected = bundles[kind]
    res = run_cli(capsys, "eval", bundle, "--tasks", "prumerge_world", "--images", IMAGES, "-o", tmp_path / "out")
    assert res.code == 0, res.err
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    results = report["results"]
    for question in QUESTION_TYPES:
        assert results[f"prumerge_world_{question}"]["accuracy,none"] == pytest.approx(expected.accuracy[question])
    assert results["prumerge_world"]["accuracy,none"] == pytest.approx(expected.accuracy["overall"])
    assert report["regime"] == {"training-free": "training-free", "fine-tuned": "fine-tuned",
                                "predictor": "training-free"}[kind] or report["method"] == "dynamic"  # fmt: skip
    assert report["visual_tokens"]["requests"] == expected.questions
    assert {"prumerge", "torch", "transformers", "lmms_eval"} <= set(report["versions"])


def test_baseline_scores_the_checkpoint_as_it_is_and_prints_the_ratios(capsys, bundles, tmp_path):
    bundle, expected = bundles["fine-tuned"]  # its baseline: the LLaVA it was tuned from, without its adapters
    res = run_cli(capsys, "eval", bundle, "--tasks", "prumerge_world_color,prumerge_world_count", "--images",
                  IMAGES, "--baseline", "-o", tmp_path / "out")  # fmt: skip
    assert res.code == 0, res.err
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["baseline"]["visual_tokens"]["mean"] == 256
    every = report["baseline"]["results"]["prumerge_world_color"]["accuracy,none"]
    from prumerge_cli.encoder import ReducedVisionEncoder

    plain = ReducedVisionEncoder.from_pretrained(LLAVA_DIR, "none")
    full = vqa_accuracy(plain, LlavaLm.from_pretrained(LLAVA_DIR), images=IMAGES)
    assert every == pytest.approx(full.accuracy["color"])
    count = report["baseline"]["results"]["prumerge_world_count"]["accuracy,none"]
    assert count == pytest.approx(full.accuracy["count"])
    assert report["ratios"]["prumerge_world_color"] == pytest.approx(expected.accuracy["color"] / every)
    assert "every token" in res.out and "prumerge_world_count" in res.out


def test_the_entry_point_serves_lmms_eval_s_own_command(bundles, cache, tmp_path):
    from prumerge_cli.evaluation.world_tasks import write_world_tasks

    tasks = write_world_tasks(tmp_path / "tasks", images=2)
    bundle, _ = bundles["training-free"]
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "prumerge", "--model_args",
                           f"bundle={bundle},batch_size=4", "--tasks", "prumerge_world_color", "--include_path",
                           str(tasks), "--output_path", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1",
                                            "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prumerge_world_color" in proc.stdout and "accuracy" in proc.stdout, proc.stdout[-2000:]


def test_bad_input_is_one_line(capsys, bundles, clip_dir, tmp_path):
    bundle, _ = bundles["training-free"]
    out = tmp_path / "out"
    assert run_cli(capsys, "compress", clip_dir, "-o", tmp_path / "clip").code == 0  # a tower without an LM
    assert_clean_error(run_cli(capsys, "eval", tmp_path / "clip", "--tasks", "prumerge_world_color", "-o", out),
                       "a vision tower alone")  # fmt: skip
    assert_clean_error(run_cli(capsys, "eval", bundle, "--tasks", "no_such_task", "-o", out), "unknown task")
    assert_clean_error(run_cli(capsys, "eval", LLAVA_DIR, "--tasks", "prumerge_world", "-o", out), "not a bundle")
    assert_clean_error(run_cli(capsys, "eval", bundle, "--tasks", " , ", "-o", out), "names no task")
    assert not out.exists()


def test_world_writes_the_tasks_for_include_path(capsys, tmp_path):
    res = run_cli(capsys, "world", "--lmms", "--split", "test", "--count", "2", "-o", tmp_path / "tasks")
    assert res.code == 0, res.err
    names = sorted(p.name for p in (tmp_path / "tasks").iterdir())
    assert names == sorted(["data", "utils.py", "prumerge_world.yaml", *(f"prumerge_world_{q}.yaml"
                                                                         for q in QUESTION_TYPES)])  # fmt: skip
    from datasets import load_from_disk

    data = load_from_disk(str(tmp_path / "tasks" / "data"))
    assert set(data) == set(QUESTION_TYPES) and all(len(data[q]) == 2 for q in QUESTION_TYPES)
    assert (
        str((tmp_path / "tasks" / "data").resolve()) in (tmp_path / "tasks" / "prumerge_world_color.yaml").read_text()
    )
