"""`prumerge bench` and the cost model: report content, not timings."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from prumerge_cli.bench import cost_model

from .cli_helpers import run_cli
from .test_cli import assert_clean_error

FAST = ("--iters", "1", "--warmup", "0", "--batch-sizes", "1,2")


def test_cost_model_formulas_and_reference():
    shape = cost_model.SHAPES["vicuna-7b"]
    assert cost_model.kv_cache_bytes(shape, 100) == 2 * 32 * 100 * 4096 * 2
    full, reduced = cost_model.compare_with_published()
    assert abs(full["prefill_tflops"] / full["published_tflops"] - 1) < 0.15
    assert abs(reduced["prefill_tflops"] / reduced["published_tflops"] - 1) < 0.15
    assert cost_model.prefill_flops(shape, 608) > 5 * cost_model.prefill_flops(shape, 64)
    assert cost_model.shape_named("vicuna-13b:layers=2")[1].layers == 2
    with pytest.raises(Exception, match="unknown LLM shape"):
        cost_model.shape_named("gpt-9")


def test_bench_bundle_and_export_on_two_backends(capsys, clip_dir, image_paths, tmp_path):
    assert run_cli(capsys, "compress", clip_dir, "-m", "prumerge", "-o", tmp_path / "b").code == 0
    assert run_cli(capsys, "export", tmp_path / "b", "--onnx", "-o", tmp_path / "e").code == 0
    report_path, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    res = run_cli(capsys, "bench", tmp_path / "b", tmp_path / "e", "--backends", "torch,ort", "--images",
                  image_paths[0].parent, "--json", report_path, "--plot", plot, *FAST)  # fmt: skip
    assert res.code == 0, res.err
    assert "Encoder" in res.out
    report = json.loads(report_path.read_text())
    assert report["schema"] == "prumerge-bench" and report["schema_version"] == 1
    rows = report["encoder"]
    assert [(r["method"], r["backend"]) for r in rows] == [
        ("none", "torch"), ("none", "ort"), ("prumerge", "torch"), ("prumerge", "ort"),
        ("prumerge", "torch"), ("prumerge", "ort"),
    ]  # fmt: skip
    assert {r["positions"] for r in rows} == {"original"}  # the bundle's and the export's own setting
    base = rows[0]
    assert base["tokens"]["mean"] == 576 and base["by_batch"]["2"]["ratios"]["latency"] == 1.0
    reduced = rows[2]
    assert reduced["tokens"]["max"] <= 145 and reduced["tokens"]["ratio"] < 1
    assert rows[2]["tokens"] == rows[3]["tokens"]  # torch and ORT keep the same tokens
    assert [r["variant"] for r in rows[2:]] == [f"prumerge from {tmp_path / 'b'}"] * 2 + [
        f"prumerge from {tmp_path / 'e'}"
    ] * 2
    for row in rows:  # a memory ratio only where the baseline's increase can be measured
        ratio = row["by_batch"]["2"]["ratios"]["memory"]
        assert (ratio is None) == (base["by_batch"]["2"]["memory"]["increase_mib"] < 1)
    assert -1 <= reduced["fidelity"]["mean_embedding_cosine"] <= 1
    for row in rows:
        for batch in ("1", "2"):
            b = row["by_batch"][batch]
            assert b["latency_ms"]["p50"] > 0 and b["images_per_s"] > 0 and b["memory"]["peak_mib"] > 0
    assert Image.open(plot).size[0] > 500


def test_bench_with_a_llava_llm_reports_prefill_kv_and_answers(capsys, llava_dir, image_paths, tmp_path):
    report_path = tmp_path / "bench.json"
    res = run_cli(capsys, "bench", llava_dir, "--methods", "prumerge,pool", "--llm", llava_dir, "--images",
                  image_paths[0].parent, "--json", report_path, "--positions", "contiguous", *FAST)  # fmt: skip
    assert res.code == 0, res.err
    report = json.loads(report_path.read_text())
    assert {r["positions"] for r in report["encoder"]} == {"contiguous"}
    llm = report["llm"]
    assert [r["variant"] for r in llm if r["batch"] == 1] == [
        "none", "prumerge (contiguous positions)", "pool side=12 (contiguous positions)"
    ]  # fmt: skip
    base, reduced = llm[0], llm[1]
    assert base["fidelity"] == {"next_token_kl": 0.0, "greedy_agreement": 1.0}
    assert reduced["fidelity"]["next_token_kl"] >= 0 and 0 <= reduced["fidelity"]["greedy_agreement"] <= 1
    assert reduced["kv_cache_bytes"] < base["kv_cache_bytes"] and reduced["sequence_tokens"] < base["sequence_tokens"]
    assert reduced["ratios"]["kv_cache"] == pytest.approx(reduced["kv_cache_bytes"] / base["kv_cache_bytes"])


def test_bench_llm_shape_compares_with_the_cost_model(capsys, clip_dir, tmp_path):
    report_path = tmp_path / "bench.json"
    res = run_cli(capsys, "bench", clip_dir, "--llm-shape", "vicuna-7b:layers=1", "--synthetic", "2",
                  "--json", report_path, "--iters", "1", "--warmup", "0", "--batch-sizes", "1")  # fmt: skip
    assert res.code == 0, res.err
    llm = json.loads(report_path.read_text())["llm"]
    assert llm[0]["cost_model"]["ideal_prefill_ratio"] == 1.0
    assert 0 < llm[1]["cost_model"]["ideal_prefill_ratio"] < 1
    assert llm[1]["kv_cache_bytes"] == 2 * 1 * llm[1]["sequence_tokens"] * 4096 * 4  # one fp32 layer


def test_bench_errors(capsys, clip_dir, siglip_dir, tmp_path):
    assert_clean_error(run_cli(capsys, "bench", clip_dir, siglip_dir, *FAST), "one model")
    assert_clean_error(run_cli(capsys, "bench", clip_dir, "--backends", "gpu", *FAST), "unknown backend")
    assert_clean_error(run_cli(capsys, "bench", clip_dir, "--batch-sizes", "a,b"), "comma-separated")
    assert_clean_error(run_cli(capsys, "bench", tmp_path, *FAST), "not a model directory")
    res = run_cli(capsys, "bench", clip_dir, "--images", tmp_path, "--synthetic", "2", *FAST)
    assert_clean_error(res, "use either --images or --synthetic")
    if __import__("importlib.util").util.find_spec("tensorrt") is None:
        assert_clean_error(run_cli(capsys, "bench", clip_dir, "--backends", "trt", *FAST), "TensorRT is not installed")


def test_bench_in_half_precision_keeps_each_variant_in_its_dtype(capsys, clip_dir, tmp_path):
    """--dtype fp16: the torch tower runs in fp16 and the ONNX export is an fp16 graph (exporting never casts the
    shared tower in place); bf16 is refused outside the torch backend."""
    report_path = tmp_path / "bench.json"
    res = run_cli(capsys, "bench", clip_dir, "--dtype", "fp16", "--backends", "torch,ort", "--synthetic", "2",
                  "--json", report_path, *FAST)  # fmt: skip
    assert res.code == 0, res.err
    rows = json.loads(report_path.read_text())["encoder"]
    assert {r["backend"] for r in rows} == {"torch", "ort"} and rows[0]["tokens"]["mean"] == 576
    res = run_cli(capsys, "bench", clip_dir, "--dtype", "bf16", "--backends", "torch,ort", *FAST)
    assert_clean_error(res, "bf16 runs on the torch backend only")
