"""A plain, loop-based rendering of the official PruMerge / PruMerge+ algorithm, written from
shared/specs/prumerge.md §2 for parity tests and benchmarks. Batch size 1 semantics; slow on purpose."""

from __future__ import annotations

import numpy as np
import torch


def tower_signals_by_hooks(tower: torch.nn.Module, pixel_values: torch.Tensor, feature_layer: int = -2):
    """Run the whole HF tower with output_hidden_states=True; take q/k of the next layer through forward
    hooks and the full (N+1)x(N+1) single-head attention, as the official code does.

    Returns (X [B, N, C], a [B, N], K [B, N, C])."""
    layers = tower.encoder.layers
    score_layer = layers[feature_layer % (len(layers) + 1)]
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        score_layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
        score_layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
    ]
    try:
        out = tower(pixel_values=pixel_values, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    x = out.hidden_states[feature_layer][:, 1:]
    q, k = captured["q"], captured["k"]
    attn = (q @ k.transpose(-1, -2) * x.shape[-1] ** -0.5).softmax(-1)
    return x, attn[:, 0, 1:], k[:, 1:]


def outlier_ratio(a: torch.Tensor, iqr_k: float = 1.5) -> float:
    """The official outlier detection: numpy percentiles over the flattened array, upper fence only."""
    arr = a.float().cpu().numpy().flatten()
    q1, q3 = np.percentile(arr, 25), np.percentile(arr, 75)
    return float((arr > q3 + iqr_k * (q3 - q1)).sum() / len(arr))


def complement_idx(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in [0, n) not in idx, ascending."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    return torch.arange(n)[keep]


def select(a: torch.Tensor, plus: bool, iqr_k: float = 1.5, grid_div: int = 3) -> torch.Tensor:
    """Kept (and, for PruMerge+, grid) indices of one image, in the official order."""
    n = a.shape[-1]
    ratio = outlier_ratio(a, iqr_k)
    k = int(n * ratio)
    idx = torch.topk(a, k).indices
    if not plus:
        return idx
    step = int(1 / ratio)  # ZeroDivisionError with no outlier, as upstream
    grid = torch.arange(0, n - 1, int(step / grid_div))
    extra = [int(g) for g in grid if g not in idx]
    return torch.cat([idx, torch.tensor(extra, dtype=torch.long)])


def merge(x: torch.Tensor, a: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, knn: int = 32) -> torch.Tensor:
    """One image: the kNN residual merge over candidates (other centres, then pruned tokens), plus the
    extra token appended last. x [N, C], a [N], keys [N, C], idx [M] -> [M + 1, C]."""
    n = x.shape[0]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    compl = complement_idx(idx, n)
    x_kept, k_kept = x[idx], unit[idx]
    out = torch.empty_like(x_kept)
    for i in range(len(idx)):
        cand_k = torch.cat([k_kept[:i], k_kept[i + 1 :], unit[compl]])
        cand_x = torch.cat([x_kept[:i], x_kept[i + 1 :], x[compl]])
        cand_a = torch.cat([a[idx][:i], a[idx][i + 1 :], a[compl]])
        sim = k_kept[i : i + 1] @ cand_k.T
        cluster = torch.topk(sim[0], min(knn, len(cand_k))).indices
        out[i] = x_kept[i] + (cand_a[cluster][:, None] * cand_x[cluster]).sum(0)
    extra = (a[compl][:, None] * x[compl]).sum(0, keepdim=True)
    return torch.cat([out, extra])


def reference_reduce(x, a, keys, plus: bool, knn: int = 32, iqr_k: float = 1.5):
    """Per image: (indices [M], tokens [M + 1, C]) of official PruMerge or PruMerge+."""
    idx = select(a, plus, iqr_k)
    return idx, merge(x, a, keys, idx, knn)
