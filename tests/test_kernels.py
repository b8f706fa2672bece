"""Plugin kernels under the Triton interpreter (conftest sets TRITON_INTERPRET=1 before triton is imported)
against their PyTorch references."""

from __future__ import annotations

import pytest
import torch

from prumerge_cli.plugins.kernels.sparse_kv_attention import (
    sparse_kv_attention,
    sparse_kv_attention_reference,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "tq", "tk", "dim", "causal", "with_keep"),
    [
        (2, 2, 1, 37, 16, True, True),  # decode step, ragged lengths, dropped entries
        (4, 2, 1, 20, 32, True, False),  # decode, GQA, lengths only
        (2, 1, 9, 9, 16, True, True),  # prefill, causal, keep mask
        (2, 2, 5, 40, 24, False, True),  # non-causal queries over a sparse cache, odd head dim
    ],
)
def test_sparse_kv_attention_matches_reference(dtype, heads, kv_heads, tq, tk, dim, causal, with_keep):
    gen = torch.Generator().manual_seed(tq * 100 + tk)
    batch = 3
    q = torch.randn(batch, heads, tq, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, tk, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, tk, dim, generator=gen).to(dtype)
    lengths = torch.tensor([tk, max(tq, tk - 7), max(tq, tk // 2)])
    keep = (torch.rand(batch, tk, generator=gen) > 0.3) if with_keep else None
    if keep is not None:
        keep[torch.arange(batch), lengths - 1] = True  # the newest token always sees itself
    got = sparse_kv_attention(q, k, v, lengths, keep, causal)
    want = sparse_kv_attention_reference(q, k, v, lengths, keep, causal)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_a_query_that_sees_nothing_gets_zeros():
    q, k, v = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)
    keep = torch.zeros(1, 8, dtype=torch.bool)
    out = sparse_kv_attention(q, k, v, torch.tensor([8]), keep, causal=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(sparse_kv_attention_reference(q, k, v, torch.tensor([8]), keep), torch.zeros_like(out))


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
@pytest.mark.parametrize(
    ("n", "c", "dtype"), [(64, 32, torch.float32), (100, 24, torch.float32), (64, 32, torch.float16)]
)
def test_adaptive_token_select_matches_the_reducer(method, n, c, dtype):
    from prumerge_cli.plugins.kernels.token_select import adaptive_token_select
    from prumerge_cli.reducers import build_reducer

    from .test_reducer_parity import synthetic_signals

    signals = synthetic_signals(batch=3, n=n, c=c, seed=n + c)
    reducer = build_reducer(method).for_export(n)
    want = reducer.reduce(signals)
    half = [t.to(dtype) for t in (signals.features, signals.scores, signals.keys)]
    tokens, lengths, indices = adaptive_token_select(*half, plus=method == "prumerge+", split=4)
    assert torch.equal(lengths, want.lengths)
    if dtype == torch.float32:
        assert torch.equal(indices, want.indices)
        torch.testing.assert_close(tokens, want.tokens, atol=1e-5, rtol=1e-5)
    else:  # fp16 inputs: same kept sets; tokens within half-precision error
        for b in range(3):
            k = int(lengths[b])
            assert set(indices[b, :k].tolist()) == set(want.indices[b, :k].tolist())


def test_adaptive_token_select_without_outliers_keeps_the_extra_token():
    from prumerge_cli.plugins.kernels.token_select import adaptive_token_select

    n, c = 64, 16
    feats = torch.randn(2, n, c)
    tokens, lengths, indices = adaptive_token_select(
        feats, torch.full((2, n), 1.0 / n), torch.randn(2, n, c), plus=True
    )
    assert lengths.tolist() == [1, 1] and indices[:, 0].tolist() == [-1, -1]
    torch.testing.assert_close(tokens[:, 0], feats.sum(1) / n)


@pytest.mark.parametrize("n", [16, 64, 100, 256, 576])
def test_plugin_shape_functions_agree_with_the_reducers(n):
    from prumerge_cli.plugins.shapes import select_kmax
    from prumerge_cli.reducers import build_reducer

    assert select_kmax(n, plus=False) == build_reducer("prumerge").max_tokens(n)
    assert select_kmax(n, plus=True) == build_reducer("prumerge+").max_tokens(n)


AOT_PROBE = """
import json, sys
from prumerge_cli.plugins.kernels.aot import compile_adaptive_token_select, compile_sparse_kv_attention
kernels = {"attention fp32": compile_sparse_kv_attention("fp32", 24, True),
           "attention fp16": compile_sparse_kv_attention("fp16", 24, False),
           "select+ fp32": compile_adaptive_token_select("fp32", 256, 128, True, 1.5, 32, 3),
           "select fp16": compile_adaptive_token_select("fp16", 576, 1024, False, 1.5, 32, 3)}
out = {}
for key, k in kernels.items():
    params = [l for l in k.ptx.splitlines() if ".param" in l and "ld.param" not in l]
    loaded = sorted({int(l.split("_param_")[1].split("]")[0]) for l in k.ptx.splitlines() if "ld.param" in l})
    out[key] = {"name": k.name, "entry": f".entry {k.name}" in k.ptx, "params": len(params), "loaded": loaded,
                "warps": k.num_warps, "target": ".target sm_80" in k.ptx}
json.dump(out, sys.stdout)
"""


def test_plugin_kernels_compile_ahead_of_time_to_ptx():
    """The AOT plugins' PTX: built without a GPU (Triton targets sm_80), in a process without the interpreter.
    TensorRT passes inputs, the five scalars and the outputs (11 parameters for both kernels); the two trailing
    parameters Triton adds for scratch memory must never be read. PruMerge (not +) has no use for the grid end."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kernels = json.loads(proc.stdout)
    for key, kernel in kernels.items():
        assert kernel["entry"] and kernel["target"] and kernel["warps"] >= 1
        unused = {6} if key == "select fp16" else set()
        assert kernel["params"] >= 11 and set(kernel["loaded"]) == set(range(11)) - unused, key
