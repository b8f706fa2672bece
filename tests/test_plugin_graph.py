"""`export --onnx --plugins`: selection + merge as one custom node, run by ONNX Runtime through
onnxruntime-extensions, equal to the plugin-free graph."""

from __future__ import annotations

import json
import tempfile

import onnx
import pytest
import torch

import prumerge_cli
from prumerge_cli.cli.options import fill_optional_values
from prumerge_cli.exporters.onnx_export import OnnxOptions, export_onnx
from prumerge_cli.models.images import open_image
from prumerge_cli.runtime import OrtEncoder

from .cli_helpers import run_cli
from .test_cli import assert_clean_error


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_plugin_graph_equals_plugin_free_graph(clip_dir, image_paths, tmp_path, method, monkeypatch):
    encoder = prumerge_cli.ReducedVisionEncoder.from_pretrained(clip_dir, method)
    manifest = export_onnx(encoder, tmp_path / "plug", OnnxOptions(plugins=True))
    export_onnx(encoder, tmp_path / "plain", OnnxOptions())
    model = onnx.load(str(tmp_path / "plug" / "model.onnx"))
    onnx.checker.check_model(model)
    custom = [n for n in model.graph.node if n.domain == "prumerge"]
    assert [n.op_type for n in custom] == ["AdaptiveTokenSelect"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in custom[0].attribute}
    assert attrs["plugin_namespace"] == b"prumerge" and attrs["plugin_version"] == b"1"
    assert attrs["plus"] == int(method == "prumerge+") and attrs["aot"] == 0
    assert manifest["plugins"][0]["tensorrt_plugin"] == "prumerge::AdaptiveTokenSelect"
    assert manifest["parity"]["passed"]
    images = [open_image(p) for p in image_paths[:3]]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the session's rewritten copy goes, and leaves
    plug, plain = (
        OrtEncoder(tmp_path / "plug").encode_images(images),
        OrtEncoder(tmp_path / "plain").encode_images(images),
    )
    assert torch.equal(plug.indices, plain.indices) and torch.equal(plug.lengths, plain.lengths)
    torch.testing.assert_close(plug.tokens, plain.tokens, atol=1e-5, rtol=1e-5)
    assert list(scratch.iterdir()) == []


def test_plugins_cli_and_unsupported_methods(capsys, clip_dir, tmp_path):
    res = run_cli(capsys, "export", clip_dir, "--onnx", "--plugins", "-o", tmp_path / "p")
    assert res.code == 0, res.err
    assert "AdaptiveTokenSelect" in res.out
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["plugins"][0]["domain"] == "prumerge"
    out = tmp_path / "q"
    assert_clean_error(run_cli(capsys, "export", clip_dir, "-m", "topk", "--onnx", "--plugins", "-o", out), "--plugins")
    assert not out.exists()


def test_plugins_value_is_optional(capsys, clip_dir, tmp_path):
    assert fill_optional_values(["export", "m", "--plugins", "-o", "x"]) == [
        "export",
        "m",
        "--plugins",
        "jit",
        "-o",
        "x",
    ]
    assert fill_optional_values(["--onnx", "--plugins"]) == ["--onnx", "--plugins", "jit"]
    assert fill_optional_values(["--plugins", "aot"]) == ["--plugins", "aot"]
    res = run_cli(capsys, "export", clip_dir, "--onnx", "--plugins", "none", "-o", tmp_path / "n")
    assert res.code == 0, res.err
    assert json.loads((tmp_path / "n" / "manifest.json").read_text())["plugins"] == []
    res = run_cli(capsys, "export", clip_dir, "--onnx", "--plugins", "aot", "-o", tmp_path / "a")
    assert res.code == 0, res.err
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["plugins"][0]["implementation"] == "aot"
    (node,) = [n for n in onnx.load(str(tmp_path / "a" / "model.onnx")).graph.node if n.domain == "prumerge"]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["aot"] == 1
    out = tmp_path / "bad"
    assert_clean_error(run_cli(capsys, "export", clip_dir, "--onnx", "--plugins=fast", "-o", out), "--plugins takes")
    assert not out.exists()
