"""The sparse-KV decode step of a predictor bundle as ONNX: plugin-free (ONNX Attention) and plugin graphs,
both run by ONNX Runtime against the eager decode step; TensorRT-RTX builds the plugin-free one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from prumerge_cli.dynamic.bundle import load_dynamic, write_dynamic_bundle
from prumerge_cli.exporters.decode_export import DecodeOptions, export_decode_step, names, sample_state, step_inputs
from prumerge_cli.runtime.ort import create_session
from prumerge_cli.zoo.world import make_sample, split_seed

from .cli_helpers import run_cli
from .test_dynamic import mixed_predictors
from .test_onnx_export import assert_clean_error


@pytest.fixture(scope="module")
def bundle(llava_deep_dir, tmp_path_factory):
    """Predictors that keep about 14 of the 20 tokens `test_decisions_vary...` generates (seed 1: all 20)."""
    predictors = mixed_predictors(32, seed=4)
    state = {f"predictors.{k}": v.contiguous() for k, v in predictors.state_dict().items()}
    out = tmp_path_factory.mktemp("dyn") / "bundle"
    write_dynamic_bundle(out, llava_deep_dir, predictors.config, "predictor", state, ["predictors"], [], force=False)
    return out


@pytest.fixture(scope="module")
def model(bundle):
    dynamic, encoder = load_dynamic(bundle)
    image = encoder.encode_images([make_sample(split_seed("test", i)).image for i in range(2)], project=True)
    return dynamic, image


OPTIONS = dict(batch=2, prompt_tokens=80, new_tokens=12)


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    dynamic, image = model
    root = tmp_path_factory.mktemp("decode")
    plain = export_decode_step(dynamic, image, root / "plain", DecodeOptions(**OPTIONS))
    plugin = export_decode_step(dynamic, image, root / "plugin", DecodeOptions(**OPTIONS, plugins=True, aot=True))
    return root, plain, plugin


def test_plugin_free_graph_matches_the_eager_decode_step(exports):
    root, plain, _ = exports
    assert plain["parity"]["passed"] and plain["parity"]["decisions_and_counters_equal"]
    ops = {(n.domain, n.op_type) for n in onnx.load(root / "plain" / "model.onnx").graph.node}
    assert ("", "Attention") in ops and not any(domain == "prumerge" for domain, _ in ops)
    assert plain["buffers"] == {"dense_slots": 92, "sparse_slots": 92 - (64 - 16)}  # image top-k: 16 of 64


def test_plugin_graph_has_one_attention_node_per_layer_and_equals_the_plugin_free_graph(model, exports):
    dynamic, image = model
    root, _, plugin = exports
    graph = onnx.load(root / "plugin" / "model.onnx")
    onnx.checker.check_model(graph)
    nodes = [n for n in graph.graph.node if n.domain == "prumerge"]
    assert [n.op_type for n in nodes] == ["SparseKVAttention"] * 4
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_namespace"] == b"prumerge" and attrs["plugin_version"] == b"1" and attrs["aot"] == 1
    assert plugin["plugins"][0]["tensorrt_plugin"] == "prumerge::SparseKVAttention"
    assert plugin["parity"]["passed"]
    cache, token = sample_state(dynamic, image, DecodeOptions(**OPTIONS))
    inputs, outputs = names(4)
    feed = dict(zip(inputs, [t.numpy() for t in step_inputs(dynamic, cache, token)], strict=True))
    a = create_session(root / "plain" / "model.onnx", None).run(outputs, feed)
    b = create_session(root / "plugin" / "model.onnx", None, plugins=True).run(outputs, feed)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
    for x, y in zip(a[1:], b[1:], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_decisions_vary_and_dropped_slots_are_reused(model, exports):
    """Drive the plugin-free graph for 10 steps: tokens are dropped, and the sparse counter only advances on
    kept ones (a dropped token's slot is the next token's) while the dense counter counts every token."""
    dynamic, image = model
    root, _, _ = exports
    session = create_session(root / "plain" / "model.onnx", None)
    cache, token = sample_state(dynamic, image, DecodeOptions(**OPTIONS))
    inputs, outputs = names(4)
    feed = [t.numpy() for t in step_inputs(dynamic, cache, token)]
    start_dense, start_sparse = feed[1].copy(), feed[2].copy()
    kept = []
    for _ in range(10):
        got = session.run(outputs, dict(zip(inputs, feed, strict=True)))
        kept.append(got[1])
        token = torch.from_numpy(got[0]).argmax(-1)
        with torch.no_grad():
            feed = [dynamic.lm.embed(token)[:, None].numpy(), got[2], got[3], *got[4:]]
    kept = np.stack(kept, 1)
    assert kept.sum() < kept.size
    assert np.array_equal(feed[1], start_dense + 10) and np.array_equal(feed[2], start_sparse + kept.sum(1))


def test_rtx_builds_the_plugin_free_decode_graph(exports):
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 cannot be installed here")
    from prumerge_cli.exporters.trt_build import build_engine

    root, _, _ = exports
    plan, cache = build_engine(trt, root / "plain" / "model.onnx", None, None)
    assert len(plan) > 10_000 and len(cache) > 0


def test_cli_exports_the_decode_step_and_trt_needs_tensorrt(bundle, tmp_path, capsys):
    res = run_cli(capsys, "export", bundle, "--onnx", "--plugins", "-o", tmp_path / "d", "--prompt-tokens", 80,
                  "--new-tokens", 8)  # fmt: skip
    assert res.code == 0, res.err
    assert "4 x prumerge::SparseKVAttention" in res.out and "passed" in res.out
    if not _has_tensorrt():
        res = run_cli(capsys, "export", bundle, "--trt", "-o", tmp_path / "e")
        assert_clean_error(res, 'pip install "prumerge[trt]"')
        assert not (tmp_path / "e").exists()


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None
