"""Official PruMerge / PruMerge+ semantics at batch size 1, against the spec-literal loop reference."""

from __future__ import annotations

import pytest
import torch

from prumerge_cli.errors import PrumergeError
from prumerge_cli.reducers import EXTRA_INDEX, PAD_INDEX, TowerSignals, build_reducer

from .official_reference import merge, reference_reduce, select


def synthetic_signals(batch: int, n: int = 576, c: int = 48, seed: int = 0, dtype=torch.float32) -> TowerSignals:
    """Features, keys and softmax scores with a heavy tail whose size differs per image."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, n + 1, generator=gen)
    for b in range(batch):
        spikes = torch.randperm(n, generator=gen)[: 4 + 13 * b]
        logits[b, spikes + 1] += 2.0 + 3 * torch.rand(len(spikes), generator=gen)
    scores = logits.softmax(-1)[:, 1:]
    feats = torch.randn(batch, n, c, generator=gen)
    keys = torch.randn(batch, n, c, generator=gen)
    side = int(n**0.5)
    return TowerSignals(feats.to(dtype), scores.to(dtype), keys.to(dtype), (side, side))


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_matches_official_loop_per_image(method):
    signals = synthetic_signals(batch=4)
    out = build_reducer(method)(signals)
    for b in range(4):
        idx, ref = reference_reduce(signals.features[b], signals.scores[b], signals.keys[b], plus=method == "prumerge+")
        n = int(out.lengths[b])
        assert n == len(idx) + 1
        assert out.indices[b, : n - 1].tolist() == idx.tolist()
        assert out.indices[b, n - 1] == EXTRA_INDEX
        assert (out.indices[b, n:] == PAD_INDEX).all()
        torch.testing.assert_close(out.tokens[b, :n], ref, atol=1e-5, rtol=1e-5)
        assert not out.tokens[b, n:].any()


def test_outlier_counts_differ_across_images():
    out = build_reducer("prumerge")(synthetic_signals(batch=4))
    assert len(set(out.lengths.tolist())) > 1


@pytest.mark.parametrize("method", ["prumerge", "prumerge+", "topk"])
def test_batch_invariance(method):
    signals = synthetic_signals(batch=5, seed=3)
    reducer = build_reducer(method)
    batched = reducer(signals)
    for b in range(5):
        single = reducer(
            TowerSignals(*(t[b : b + 1] for t in (signals.features, signals.scores, signals.keys)), signals.grid)
        )
        row = batched.row(b)
        assert torch.equal(row.indices, single.indices)
        torch.testing.assert_close(row.tokens, single.tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference_in_same_dtype(dtype):
    """Selection and the extra token match in both half types; merged centres are compared in fp16 only,
    since bf16's 8-bit mantissa makes cosine ties common and the spec leaves topk tie order open."""
    signals = synthetic_signals(batch=2, dtype=dtype, seed=1)
    out = build_reducer("prumerge")(signals)
    assert out.tokens.dtype == dtype
    for b in range(2):
        idx, ref = reference_reduce(signals.features[b], signals.scores[b], signals.keys[b], plus=False)
        n = int(out.lengths[b])
        assert set(out.indices[b, : n - 1].tolist()) == set(idx.tolist())
        torch.testing.assert_close(out.tokens[b, n - 1].float(), ref[-1].float(), atol=0.05, rtol=0.02)
        if dtype == torch.float16:
            torch.testing.assert_close(out.tokens[b, :n].float(), ref.float(), atol=0.05, rtol=0.02)


def test_no_outlier_keeps_only_the_extra_token():
    n, c = 64, 8
    feats = torch.randn(2, n, c)
    signals = TowerSignals(feats, torch.full((2, n), 1.0 / (n + 1)), torch.randn(2, n, c), (8, 8))
    out = build_reducer("prumerge")(signals)
    assert out.lengths.tolist() == [1, 1]
    torch.testing.assert_close(out.tokens[:, 0], feats.sum(1) / (n + 1))
    with pytest.warns(UserWarning, match="no outlier"):
        plus = build_reducer("prumerge+")(signals)
    assert plus.lengths.tolist() == [1, 1]
    with pytest.raises(ZeroDivisionError):
        select(signals.scores[0], plus=True)


def test_fewer_tokens_than_knn_plus_one():
    signals = synthetic_signals(batch=1, n=16, c=8, seed=2)
    out = build_reducer("prumerge", knn=32)(signals)
    idx = select(signals.scores[0], plus=False)
    ref = merge(signals.features[0], signals.scores[0], signals.keys[0], idx, knn=32)
    torch.testing.assert_close(out.tokens[0, : int(out.lengths[0])], ref, atol=1e-5, rtol=1e-5)


def test_nan_features_raise():
    signals = synthetic_signals(batch=1, n=64)
    signals.features[0, 3, 0] = float("nan")
    with pytest.raises(PrumergeError, match="NaN"):
        build_reducer("prumerge")(signals)


def test_bounds_hold_and_match_the_spec():
    assert build_reducer("prumerge").max_tokens(576) == 145
    assert build_reducer("prumerge+").max_tokens(576) == 577
    assert build_reducer("topk").max_tokens(576) == 73
    for seed in range(4):
        signals = synthetic_signals(batch=3, seed=seed)
        for method in ("prumerge", "prumerge+"):
            reducer = build_reducer(method)
            assert int(reducer(signals).lengths.max()) <= reducer.max_tokens(576)


def test_raster_order_is_the_same_set_sorted():
    signals = synthetic_signals(batch=2, seed=4)
    official = build_reducer("prumerge+")(signals)
    raster = build_reducer("prumerge+", order="raster")(signals)
    assert torch.equal(official.lengths, raster.lengths)
    for b in range(2):
        n = int(official.lengths[b]) - 1
        assert sorted(official.indices[b, :n].tolist()) == raster.indices[b, :n].tolist()


def test_topk_without_merge_is_plain_pruning():
    signals = synthetic_signals(batch=2)
    out = build_reducer("topk", budget=10, merge=False)(signals)
    assert out.lengths.tolist() == [10, 10]
    top = torch.topk(signals.scores, 10).indices
    assert torch.equal(out.indices, top)
    torch.testing.assert_close(out.tokens, torch.gather(signals.features, 1, top[..., None].expand(-1, -1, 48)))


def test_pool_and_random_baselines():
    signals = synthetic_signals(batch=2, n=576)
    pool = build_reducer("pool", side=12)(signals)
    assert pool.tokens.shape == (2, 144, 48)
    grid = signals.features[0].view(24, 24, 48)
    torch.testing.assert_close(pool.tokens[0, 0], grid[:2, :2].mean((0, 1)))
    rnd = build_reducer("random", budget=50, seed=7)(signals)
    again = build_reducer("random", budget=50, seed=7)(signals)
    assert torch.equal(rnd.indices, again.indices) and rnd.lengths.tolist() == [50, 50]
    assert rnd.indices[0].tolist() == sorted(set(rnd.indices[0].tolist()))


def test_unknown_method_and_parameter_are_clean_errors():
    from prumerge_cli import PrumergeError

    with pytest.raises(PrumergeError, match="unknown method"):
        build_reducer("magic")
    with pytest.raises(PrumergeError, match="no parameter"):
        build_reducer("prumerge", grid_div=2)
    with pytest.raises(PrumergeError, match="knn"):
        build_reducer("prumerge", knn=0)
