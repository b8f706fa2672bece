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
    ("heads", "kv_heads", "tq", "tk", "dim", "causal", "with_keep", "splits"),
    [
        (2, 2, 1, 37, 16, True, True, 1),  # decode step, ragged lengths, dropped entries
        (4, 2, 1, 20, 32, True, False, 1),  # decode, GQA, lengths only
        (2, 1, 9, 9, 16, True, True, 1),  # prefill, causal, keep mask
        (2, 2, 5, 40, 24, False, True, 1),  # non-causal queries over a sparse cache, odd head dim
        (4, 1, 1, 300, 32, True, True, 3),  # decode split over the KV length, GQA packed into one tile
        (2, 2, 20, 150, 16, True, False, 2),  # prefill blocks of 64 rows, split
    ],
)
def test_sparse_kv_attention_matches_reference(dtype, heads, kv_heads, tq, tk, dim, causal, with_keep, splits):
    gen = torch.Generator().manual_seed(tq * 100 + tk)
    batch = 3
    q = torch.randn(batch, heads, tq, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, tk, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, tk, dim, generator=gen).to(dtype)
    lengths = torch.tensor([tk, max(tq, tk - 7), max(tq, tk // 2)])
    keep = (torch.rand(batch, tk, generator=gen) > 0.3) if with_keep else None
    if keep is not None:
        keep[torch.arange(batch), lengths - 1] = True  # the newest token always sees itself
    got = sparse_kv_attention(q, k, v, lengths, keep, causal, splits=splits)
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
    tokens, lengths, indices = adaptive_token_select(*half, plus=method == "prumerge+")
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


PTX_PROBE = """
import json, sys
from prumerge_cli.plugins.kernels import aot, ptx_report
kernels = {}
for dtype in ("fp32", "fp16"):
    for plus in (False, True):
        name = f"select{'+' if plus else ''} {dtype} 576x1024"
        kernels[name] = aot.compile_adaptive_token_select(dtype, 576, 1024, plus, 1.5, 32, 3, {cap})
    for group in (1, 4):  # multi-head (Vicuna) and 4 query heads per KV head (GQA), one new token
        kernels[f"decode attention {dtype} d128 g{group}"] = aot.compile_sparse_kv_attention(dtype, 128, True, group,
                                                                                             {cap})
kernels["decode attention fp32 d128 g1 tf32"] = aot.compile_sparse_kv_attention("fp32", 128, True, 1, {cap}, "tf32")
out = {}
for key, k in kernels.items():
    params = [l for l in k.ptx.splitlines() if ".param" in l and "ld.param" not in l]
    loaded = sorted({int(l.split("_param_")[1].split("]")[0]) for l in k.ptx.splitlines() if "ld.param" in l})
    rep = ptx_report.report(k.ptx, "{arch}")
    out[key] = {"entry": f".entry {k.name}" in k.ptx, "params": len(params), "loaded": loaded, "warps": k.num_warps,
                "shared": k.shared_bytes, **rep.__dict__, "line": rep.line()}
json.dump(out, sys.stdout)
"""


@pytest.mark.parametrize(("cap", "arch"), [((8, 0), "sm_80"), ((9, 0), "sm_90a")])
def test_aot_kernels_assemble_for_ampere_and_hopper(cap, arch):
    """The AOT plugins' PTX at ViT-L's shapes (576 x 1024) and a decode step of head size 128, compiled without a
    GPU in a process without the interpreter and assembled by ptxas: PTX ISA 8.4 (CUDA 12.4, what the README
    names), accepted; fp32 kernels use no TF32 tensor cores (their 1e-5 tolerance holds on a GPU) unless
    `input_precision="tf32"` asks; fp16 kernels use MMA; TensorRT passes inputs, scalars and outputs, and
    Triton's two trailing scratch parameters are never read; nothing spills to local memory."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = PTX_PROBE.replace("{cap}", repr(cap)).replace("{arch}", arch)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key, kernel in json.loads(proc.stdout).items():
        print(key, kernel["line"])
        assert kernel["entry"] and kernel["ptx_version"] == "8.4", key
        assert (kernel["tf32_mma"] > 0) == key.endswith("tf32"), key  # TF32 only where input_precision asks
        assert (kernel["mma"] > 0) == ("fp16" in key or key.endswith("tf32")), key
        assert kernel["spill_stores"] == kernel["spill_loads"] == 0, key
        io = 10 if key.startswith("select") else 11  # 3 inputs + 4 scalars + 3 outputs; 5 + 5 + 1
        unused = {6} if key.startswith("select ") else set()  # PruMerge (not +) has no use for the grid end
        assert kernel["params"] >= io and set(kernel["loaded"]) == set(range(io)) - unused, key


def test_pack_rows_puts_each_images_valid_rows_one_after_another():
    """AdaptiveTokenSelectCount's packing (no host read): equal to boolean-mask packing, padding rows after."""
    from prumerge_cli.plugins.packing import pack_rows

    tokens = torch.randn(3, 5, 4)
    indices = torch.arange(15).view(3, 5)
    lengths = torch.tensor([2, 5, 0])
    packed_tokens, packed_indices, count = pack_rows(tokens, indices, lengths)
    valid = torch.arange(5)[None, :] < lengths[:, None]
    assert int(count) == 7 and packed_tokens.shape == (15, 4)
    assert torch.equal(packed_tokens[:7], tokens[valid]) and torch.equal(packed_indices[:7], indices[valid])
    assert sorted(packed_indices.tolist()) == list(range(15))  # a permutation: nothing lost or duplicated


def test_kernels_read_their_inputs_and_nothing_else():
    """Counted under the interpreter: the selection kernel touches every input byte and no other (its re-reads,
    one pass over keys and gathered neighbour rows per 16 output slots, hit the L2 on a GPU); the decode attention
    reads q and only the valid part of the cache, each key/value row once for a whole group of query heads."""
    from prumerge_cli.plugins.kernels.token_select import adaptive_token_select
    from prumerge_cli.plugins.kernels.traffic import count_reads

    from .test_reducer_parity import synthetic_signals

    signals = synthetic_signals(batch=1, n=64, c=32, seed=3)
    x, s, k = (t.half() for t in (signals.features, signals.scores, signals.keys))
    with count_reads() as reads:
        _, lengths, _ = adaptive_token_select(x, s, k, plus=False)
    minimum = 2 * x.numel() * 2 + s.numel() * 2
    tiles = -(-int(lengths[0]) // 16)
    assert reads.distinct == minimum
    assert minimum < reads.requested <= minimum + tiles * (k.numel() * 2 + 16 * (32 + 1) * 32 * 2 * 2)

    q = torch.randn(1, 4, 1, 64).half()  # 4 query heads share one KV head
    cache_k, cache_v = torch.randn(1, 1, 300, 64).half(), torch.randn(1, 1, 300, 64).half()
    valid = 200
    keep = torch.rand(1, 300) > 0.3
    with count_reads() as reads:
        sparse_kv_attention(q, cache_k, cache_v, torch.tensor([valid]), keep, causal=True, splits=1)
    minimum = q.numel() * 2 + 2 * valid * 64 * 2 + 4 + valid
    assert reads.requested == reads.distinct == minimum
