"""The commands on family checkpoints (tiny LLaVA-NeXT at the released model's geometry, and the others):
compress writes a bundle with its scope, inspect reports the LM's tokens per image and draws the tiles, patch
reads the bundle's settings, and what cannot apply is refused in one line."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

import prumerge_cli
from prumerge_cli.bundle import read_bundle
from prumerge_cli.zoo.families import FAMILIES, save_family

from .cli_helpers import run_cli
from .test_cli import assert_clean_error


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return save_family("llava_next", tmp_path_factory.mktemp("next") / "model", "real")


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory):
    """A 672x336 image with a red and a blue square on a dark ground."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((336, 672, 3)) * 60).astype(np.uint8)
    pixels[100:200, 150:250] = (230, 40, 40)
    pixels[50:120, 500:600] = (40, 40, 230)
    path = tmp_path_factory.mktemp("images") / "wide.png"
    Image.fromarray(pixels).save(path)
    return path


def test_compress_and_inspect_a_llava_next_checkpoint(capsys, next_dir, wide_image, tmp_path):
    bundle = tmp_path / "b"
    res = run_cli(capsys, "compress", next_dir, "-o", bundle, "--scope", "image")
    assert res.code == 0, res.err
    record = read_bundle(bundle)
    assert (record["family"], record["scope"], record["method"]) == ("llava_next", "image", "prumerge")
    report, overlays = tmp_path / "r.json", tmp_path / "ov"
    res = run_cli(capsys, "inspect", next_dir, wide_image, "--json", report, "--overlay", overlays)
    assert res.code == 0, res.err
    row = json.loads(report.read_text())["images"][0]
    # 672x336: the base tile and two grid tiles of 24x24; unpadded 24 rows of 48 and a newline each
    assert row["pixel_tiles"] == 3 and row["stock_tokens"] == 576 + 24 * 49
    assert len(row["kept_per_tile"]) == 3 and row["tokens"] == sum(row["kept_per_tile"]) + row["newlines"]
    assert 0 < row["newlines"] <= 24 and row["tokens"] < row["stock_tokens"]
    assert {s for s, _ in row["kept_cells"]} == {0, 1, 2}
    overlay = Image.open(overlays / "wide.overlay.png")
    assert overlay.width > 3 * 224
    assert "wide.png" in res.out and "kept per tile" in res.out


def test_patch_reads_a_family_bundle_s_settings(capsys, next_dir, tmp_path):
    bundle = tmp_path / "b"
    assert run_cli(capsys, "compress", next_dir, "-o", bundle, "-m", "pool", "-p", "side=6").code == 0
    model = AutoModelForImageTextToText.from_pretrained(str(next_dir), dtype=torch.float32)
    prumerge_cli.patch(model, bundle)
    try:
        assert model._prumerge_reducer.params() == {"side": 6}
        assert (model._prumerge_scope, model._prumerge_positions) == ("tile", "original")
    finally:
        prumerge_cli.unpatch(model)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_compresses_and_inspects(capsys, name, wide_image, tmp_path):
    model_dir = save_family(name, tmp_path / name, "small")
    bundle = tmp_path / "b"
    assert run_cli(capsys, "compress", model_dir, "-o", bundle, "-m", "prumerge").code == 0
    res = run_cli(capsys, "inspect", bundle, wide_image, "--json", tmp_path / "r.json")
    assert res.code == 0, res.err
    report = json.loads((tmp_path / "r.json").read_text())
    row = report["images"][0]
    assert row["tokens"] == sum(row["kept_per_tile"]) + row["newlines"] < row["stock_tokens"]
    # PruMerge's own score is the [CLS] row of a CLIP tower; elsewhere it is its received-attention variant
    assert report["method"] == ("prumerge" if name == "llava_next" else "prumerge (received attention)")


def test_what_a_family_cannot_take_is_refused_in_one_line(capsys, next_dir, tmp_path):
    out = tmp_path / "b"
    assert_clean_error(run_cli(capsys, "compress", next_dir, "-o", out, "--finetune"), "tiled or pooled family")
    assert_clean_error(run_cli(capsys, "compress", next_dir, "-o", out, "--score-layer", "1"), "--score-layer")
    assert_clean_error(run_cli(capsys, "compress", next_dir, "-o", out, "--scope", "page"), "scope must be one of")
    assert_clean_error(run_cli(capsys, "compress", next_dir, "-o", out, "-m", "pool", "--scope", "image"),
                       "scope=image has no grid")  # fmt: skip
    assert not out.exists()


def test_an_m_rope_model_s_bundle_keeps_original_positions(capsys, tmp_path):
    """Qwen's tokens keep their 3-D positions: contiguous is refused before loading, not recorded and ignored."""
    model_dir = save_family("qwen2_5_vl", tmp_path / "qwen", "small")
    out = tmp_path / "b"
    res = run_cli(capsys, "compress", model_dir, "-o", out, "--positions", "contiguous")
    assert_clean_error(res, "positions must be original")
    assert not out.exists()
    assert run_cli(capsys, "compress", model_dir, "-o", out).code == 0
    assert json.loads((out / "reducer.json").read_text())["positions"] == "original"


def test_bench_on_a_family_reports_tokens_time_and_prefill_beside_the_stock_model(capsys, next_dir, tmp_path):
    report = tmp_path / "r.json"
    res = run_cli(capsys, "bench", next_dir, "--methods", "prumerge,pool", "--batch-sizes", "2", "--synthetic", "2",
                  "--iters", "1", "--warmup", "0", "--json", report)  # fmt: skip
    assert res.code == 0, res.err
    found = json.loads(report.read_text())
    rows = {r["variant"]: r for r in found["family_rows"]}
    assert found["llm_shape"] == "vicuna-7b" and set(rows) == {"none", "prumerge", "pool"}
    assert rows["none"]["tokens"] == rows["none"]["stock_tokens"] == 2928  # 672x672: 576 + 48 x 49
    assert rows["none"]["prefill_ratio"] == 1.0 and rows["prumerge"]["prefill_ratio"] < 0.5
    assert rows["pool"]["tokens"] == 576 // 4 * 5 + 24  # 12x12 per tile, a newline per pooled row of the grid
    assert "672x672" in res.out


def test_bench_refuses_what_only_llava_1_5_checkpoints_take(capsys, next_dir, tmp_path):
    for extra, fragment in ((["--backends", "trt"], "--backends trt"), (["--backends", "ort"], "cut to each image's"),
                            (["--plot", tmp_path / "p.png"], "--plot")):  # fmt: skip
        assert_clean_error(run_cli(capsys, "bench", next_dir, "--synthetic", "1", *extra), fragment)
    assert not (tmp_path / "p.png").exists()


def test_generate_answers_with_a_llava_next_bundle_as_the_patched_model_does(capsys, next_dir, wide_image, tmp_path):
    bundle = tmp_path / "b"
    assert run_cli(capsys, "compress", next_dir, "-o", bundle).code == 0
    res = run_cli(capsys, "generate", bundle, "--image", wide_image, "--prompt", "what shape is there",
                  "--max-new-tokens", "4")  # fmt: skip
    assert res.code == 0, res.err
    answer, stats = [line for line in res.out.splitlines() if line.strip()][-2:]
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(next_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(next_dir), dtype=torch.float32)
    prumerge_cli.patch(model, bundle)
    inputs = processor(images=[Image.open(wide_image)], text=["<s><image>what shape is there"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert answer == processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert stats.startswith(f"{model._prumerge_counts[0]} visual tokens kept")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="InternVL's processor needs it")
def test_generate_says_in_one_line_when_transformers_cannot_build_the_processor(capsys, tmp_path):
    model_dir = save_family("internvl", tmp_path / "internvl", "small")
    Image.new("RGB", (64, 64)).save(tmp_path / "q.png")
    assert run_cli(capsys, "compress", model_dir, "-o", tmp_path / "b").code == 0
    res = run_cli(capsys, "generate", tmp_path / "b", "--image", tmp_path / "q.png", "--prompt", "what")
    assert_clean_error(res, "generate needs it")


def test_generate_answers_with_a_gemma3_bundle_through_its_processor(capsys, wide_image, tmp_path):
    model_dir = save_family("gemma3", tmp_path / "gemma3", "small")
    bundle = tmp_path / "b"
    assert run_cli(capsys, "compress", model_dir, "-o", bundle).code == 0
    res = run_cli(capsys, "generate", bundle, "--image", wide_image, "--prompt", "what color", "--max-new-tokens", "3")
    assert res.code == 0, res.err
    answer, stats = res.out.rstrip("\n").split("\n")[-2:]  # the answer may decode to nothing
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    prumerge_cli.patch(model, bundle)
    question = {"type": "text", "text": "what color"}
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, question]}])
    inputs = processor(images=[Image.open(wide_image).convert("RGB")], text=[text], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert answer == processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert stats.startswith(f"{model._prumerge_counts[0]} visual tokens kept") and model._prumerge_counts[0] < 16
