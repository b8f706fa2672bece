"""ONNX export: round trip through real ONNX Runtime sessions, manifests, errors, TensorRT-RTX builds."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import prumerge_cli
from prumerge_cli.exporters.onnx_export import OnnxOptions, export_onnx
from prumerge_cli.models.images import open_image
from prumerge_cli.runtime import OrtEncoder
from prumerge_cli.zoo import LLAVA_DIR

from .cli_helpers import run_cli, run_subprocess
from .test_cli import assert_clean_error


@pytest.fixture(scope="module")
def plus_export(tmp_path_factory, clip_dir):
    encoder = prumerge_cli.ReducedVisionEncoder.from_pretrained(clip_dir, "prumerge+")
    out = tmp_path_factory.mktemp("exports") / "plus"
    return encoder, out, export_onnx(encoder, out, OnnxOptions(max_batch=4))


def test_manifest_describes_the_export(plus_export):
    _, out, manifest = plus_export
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["kmax"] == 577 and manifest["method"] == "prumerge+"
    assert manifest["outputs"][0]["shape"] == ["batch", 577, 64]
    assert manifest["parity"]["passed"] and manifest["parity"]["indices_equal"]
    assert manifest["parity"]["tokens_max_abs"] <= 1e-4
    assert {"torch", "onnx", "onnxruntime", "onnxscript"} <= set(manifest["versions"])
    for name, info in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"]


def test_ort_encoder_equals_torch_on_images(plus_export, image_paths):
    encoder, out, _ = plus_export
    images = [open_image(p) for p in image_paths[:3]]  # 3 is not the export's sample batch
    want = encoder.encode_images(images)
    got = OrtEncoder(out, threads=1).encode_images(images)
    assert torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-4, rtol=1e-4)


def test_export_says_nothing_of_the_graph_optimiser_s_notes(tmp_path):
    """At batch 1 the unreduced export's lengths and indices are constants the optimiser notes it leaves alone (in
    a process of its own: pytest's log capture would take the notes off stderr)."""
    res = run_subprocess("export", LLAVA_DIR, "--onnx", "-o", tmp_path / "none", "--batch-size", "1", "-m", "none")
    assert res.code == 0 and res.err == "", res.err


def test_fixed_batch_export_runs_any_batch_in_chunks(capsys, clip_dir, image_paths, tmp_path):
    res = run_cli(capsys, "export", clip_dir, "--onnx", "-o", tmp_path / "fixed", "--batch-size", "2", "-m", "prumerge")
    assert res.code == 0, res.err
    manifest = json.loads((tmp_path / "fixed" / "manifest.json").read_text())
    assert manifest["batch"] == {"fixed": 2} and manifest["kmax"] == 145
    images = [open_image(p) for p in image_paths[:3]]
    want = prumerge_cli.ReducedVisionEncoder.from_pretrained(clip_dir, "prumerge").encode_images(images)
    got = OrtEncoder(tmp_path / "fixed").encode_images(images)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-4, rtol=1e-4)


def test_fp16_export_passes_its_parity_check(clip_dir, tmp_path):
    encoder = prumerge_cli.ReducedVisionEncoder.from_pretrained(clip_dir, "prumerge")
    manifest = export_onnx(encoder, tmp_path / "half", OnnxOptions(dtype="fp16"))
    parity = manifest["parity"]
    assert parity["passed"] and parity["lengths_equal"] and parity["kept_agreement"] >= 0.9
    assert manifest["score_dtype"] == "float32" and manifest["inputs"][0]["dtype"] == "fp16"
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}  # the exporter cast a copy, not the encoder


def test_export_with_projector_gives_llm_inputs(llava_dir, image_paths, tmp_path):
    encoder = prumerge_cli.ReducedVisionEncoder.from_pretrained(llava_dir, "prumerge")
    manifest = export_onnx(encoder, tmp_path / "proj", OnnxOptions(with_projector=True))
    assert manifest["outputs"][0]["shape"][-1] == 32 and manifest["with_projector"]
    images = [open_image(p) for p in image_paths[:2]]
    want = encoder.encode_images(images, project=True)
    got = OrtEncoder(tmp_path / "proj").encode_images(images)
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-4, rtol=1e-4)


def test_siglip_export_round_trips(siglip_dir, image_paths, tmp_path):
    encoder = prumerge_cli.ReducedVisionEncoder.from_pretrained(siglip_dir, "prumerge")
    export_onnx(encoder, tmp_path / "siglip", OnnxOptions())
    images = [open_image(p) for p in image_paths[:2]]
    assert torch.equal(
        OrtEncoder(tmp_path / "siglip").encode_images(images).indices, encoder.encode_images(images).indices
    )


def test_inspect_with_ort_backend_matches_torch(capsys, plus_export, clip_dir, image_paths, tmp_path):
    _, out, _ = plus_export
    assert run_cli(capsys, "inspect", "--backend", "ort", out, *image_paths, "--json", tmp_path / "ort.json").code == 0
    assert (
        run_cli(capsys, "inspect", clip_dir, *image_paths, "-m", "prumerge+", "--json", tmp_path / "pt.json").code == 0
    )
    ort_rows = json.loads((tmp_path / "ort.json").read_text())["images"]
    torch_rows = json.loads((tmp_path / "pt.json").read_text())["images"]
    assert [r["kept_patches"] for r in ort_rows] == [r["kept_patches"] for r in torch_rows]


def test_export_errors_are_clean_and_leave_nothing(capsys, clip_dir, plus_export, tmp_path):
    _, existing, _ = plus_export
    out = tmp_path / "out"
    assert_clean_error(run_cli(capsys, "export", clip_dir, "--onnx", "-o", existing), "already exists")
    assert_clean_error(run_cli(capsys, "export", clip_dir, "--onnx", "-o", out, "--opset", "9"), "unsupported opset")
    assert_clean_error(run_cli(capsys, "export", clip_dir, "--onnx", "-o", out, "--dtype", "int8"), "unsupported dtype")
    assert_clean_error(run_cli(capsys, "export", clip_dir, "--onnx", "-o", out, "--with-projector"), "no projector")
    assert_clean_error(run_cli(capsys, "export", clip_dir, "-o", out), "--onnx or --trt")
    assert_clean_error(run_cli(capsys, "export", tmp_path / "nope", "--onnx", "-o", out), "does not exist")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_corrupt_exports_are_clean_errors(capsys, plus_export, tmp_path, image_paths):
    import shutil

    _, out, _ = plus_export
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    assert_clean_error(run_cli(capsys, "inspect", "--backend", "ort", broken, image_paths[0]), "cannot load")
    (broken / "manifest.json").unlink()
    assert_clean_error(run_cli(capsys, "inspect", "--backend", "ort", broken, image_paths[0]), "not an ONNX export")


def test_trt_without_tensorrt_names_the_missing_piece(capsys, clip_dir, tmp_path):
    if _has_tensorrt():
        pytest.skip("TensorRT is installed here")
    res = run_cli(capsys, "export", clip_dir, "--trt", "-o", tmp_path / "engine")
    assert_clean_error(res, 'pip install "prumerge[trt]"')
    assert not (tmp_path / "engine").exists()


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


@pytest.mark.parametrize("method", ["prumerge", "prumerge+", "topk"])
def test_plugin_free_graph_builds_with_tensorrt_rtx(clip_dir, tmp_path, method):
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 cannot be installed here")
    from prumerge_cli.exporters.trt_build import BatchProfile, build_engine

    encoder = prumerge_cli.ReducedVisionEncoder.from_pretrained(clip_dir, method)
    export_onnx(encoder, tmp_path / "e", OnnxOptions(max_batch=4, check=False))
    plan, cache = build_engine(trt, tmp_path / "e" / "model.onnx", 336, BatchProfile(1, 2, 4))
    assert len(plan) > 100_000 and len(cache) > 0
