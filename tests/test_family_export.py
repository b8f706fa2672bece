"""`prumerge export --onnx` of the families whose tiles are fixed squares (Gemma 3, InternVL): the graph ONNX
Runtime runs gives, once each image's tiles are packed on the host, exactly what the torch family encoder gives;
what cannot export is refused in one line before the model is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from prumerge_cli.bundle import load
from prumerge_cli.runtime.family_ort import FamilyOrtEncoder
from prumerge_cli.zoo.families import save_family
from prumerge_cli.zoo.world import samples_of

from .cli_helpers import run_cli
from .test_cli import assert_clean_error


@pytest.fixture(scope="module")
def images():
    """Two world images, one stretched wide (InternVL cuts it into more tiles)."""
    first, second = (s.image for s in samples_of("test", 0, 2))
    return [first, second.resize((600, 250), Image.BILINEAR)]


@pytest.mark.parametrize("name", ["gemma3", "internvl"])
@pytest.mark.parametrize("method", ["prumerge", "prumerge+", "pool"])
def test_the_tile_graph_runs_in_onnx_runtime_as_the_family_encoder_runs_in_torch(capsys, name, method, images,
                                                                                tmp_path):  # fmt: skip
    model_dir = save_family(name, tmp_path / name, "small")
    bundle, out = tmp_path / "b", tmp_path / "e"
    assert run_cli(capsys, "compress", model_dir, "-o", bundle, "-m", method).code == 0
    res = run_cli(capsys, "export", bundle, "--onnx", "-o", out, "--max-batch", "4")
    assert res.code == 0, res.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["parity"]["indices_equal"]
    assert manifest["inputs"][0]["shape"][0] == "tiles" and manifest["source"]["model_type"] == name
    want, got = load(bundle).encode_images(images), FamilyOrtEncoder(out).encode_images(images)
    assert [len(w.kept_per_tile) for w in want] == ([1, 1] if name == "gemma3" else [5, 3])
    for w, g in zip(want, got, strict=True):
        assert w.kept_per_tile == g.kept_per_tile and w.span == g.span
        for field in ("places", "kept_cells", "kept_sources"):
            assert torch.equal(getattr(w, field), getattr(g, field)), field
        torch.testing.assert_close(g.tokens, w.tokens, atol=1e-5, rtol=1e-5)


def test_what_the_tile_graph_cannot_be_is_refused_in_one_line(capsys, tmp_path):
    next_dir = save_family("llava_next", tmp_path / "next", "small")
    qwen_dir = save_family("qwen2_5_vl", tmp_path / "qwen", "small")
    internvl_dir = save_family("internvl", tmp_path / "internvl", "small")
    assert run_cli(capsys, "compress", internvl_dir, "-o", tmp_path / "image", "--scope", "image").code == 0
    assert run_cli(capsys, "compress", internvl_dir, "-o", tmp_path / "half", "--dtype", "fp16").code == 0
    out = tmp_path / "e"
    for args, words in [
        ((next_dir, "--onnx"), "cut to each image's aspect"),
        ((qwen_dir, "--onnx"), "no fixed-shape graph exports"),
        ((tmp_path / "image", "--onnx"), "export a --scope tile one"),
        ((internvl_dir, "--onnx", "--dtype", "fp16"), "in fp32 without plugin nodes"),
        ((internvl_dir, "--onnx", "--plugins"), "in fp32 without plugin nodes"),
        ((internvl_dir, "--trt"), "exports with --onnx"),
        ((tmp_path / "half", "--onnx"), "from an fp32 tower, not fp16"),
    ]:
        assert_clean_error(run_cli(capsys, "export", *args, "-o", out), words)
        assert not out.exists()


def test_inspect_runs_the_tile_graph_and_reports_what_the_bundle_reports(capsys, images, tmp_path):
    model_dir = save_family("internvl", tmp_path / "internvl", "small")
    bundle, out, paths = tmp_path / "b", tmp_path / "e", [tmp_path / "a.png", tmp_path / "b.png"]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    assert run_cli(capsys, "compress", model_dir, "-o", bundle, "-m", "prumerge+").code == 0
    assert run_cli(capsys, "export", bundle, "--onnx", "-o", out).code == 0
    reports = []
    for args in ((bundle,), ("--backend", "ort", out)):
        res = run_cli(capsys, "inspect", *args, *paths, "--json", tmp_path / "r.json", "--force")
        assert res.code == 0, res.err
        reports.append(json.loads((tmp_path / "r.json").read_text()))
    torch_rows, ort_rows = ([{k: row[k] for k in ("pixel_tiles", "tokens", "stock_tokens", "kept_per_tile",
                                                  "kept_cells")} for row in r["images"]] for r in reports)  # fmt: skip
    assert torch_rows == ort_rows and [row["pixel_tiles"] for row in ort_rows] == [5, 3]
    assert reports[1]["method"] == "prumerge+ (received attention)" and reports[1]["scope"] == "tile"
    res = run_cli(capsys, "inspect", "--backend", "ort", out, *paths, "--overlay", tmp_path / "ov")
    assert_clean_error(res, "inspect the bundle for overlays")
    assert_clean_error(run_cli(capsys, "inspect", out, *paths), "is an ONNX export: inspect it with --backend ort")
    assert_clean_error(run_cli(capsys, "bench", out), "bench its bundle with --backends torch,ort")


def test_bench_times_the_tile_graph_beside_the_torch_encoder(capsys, tmp_path):
    model_dir = save_family("gemma3", tmp_path / "gemma3", "small")
    report = tmp_path / "r.json"
    res = run_cli(capsys, "bench", model_dir, "--methods", "prumerge+", "--backends", "torch,ort", "--synthetic", "2",
                  "--batch-sizes", "2", "--iters", "1", "--warmup", "0", "--json", report)  # fmt: skip
    assert res.code == 0, res.err
    rows = {(r["variant"], r["backend"]): r for r in json.loads(report.read_text())["family_rows"]}
    label = "prumerge+ (received attention)"
    assert set(rows) == {(v, b) for v in ("none", label) for b in ("torch", "ort")}
    assert rows[label, "ort"]["tokens"] == rows[label, "torch"]["tokens"] < rows["none", "ort"]["tokens"] == 16
    assert rows["none", "ort"]["latency_ratio"] == rows["none", "torch"]["latency_ratio"] == 1.0


@pytest.mark.parametrize("name", ["gemma3", "internvl"])
def test_the_tile_graph_builds_with_tensorrt_rtx(name, tmp_path):
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 cannot be installed here")
    from prumerge_cli.exporters.family_onnx import export_family_onnx
    from prumerge_cli.exporters.onnx_export import OnnxOptions
    from prumerge_cli.exporters.trt_build import BatchProfile, build_engine
    from prumerge_cli.families.model import FamilyEncoder

    encoder = FamilyEncoder.from_pretrained(save_family(name, tmp_path / name, "small"), "prumerge")
    manifest = export_family_onnx(encoder, tmp_path / "e", OnnxOptions(max_batch=4, check=False))
    plan, cache = build_engine(trt, tmp_path / "e" / "model.onnx", manifest["image_size"], BatchProfile(1, 2, 4))
    assert len(plan) > 100_000 and len(cache) > 0
