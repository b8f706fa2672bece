"""Output-shape arithmetic of the plugins, written with + - * // only and with the symbolic operand on the left
(TensorRT's `ShapeExpr` has no reflected operators: `3 * n` fails, `n * 3` works), so that the same functions
work on Python ints (tests, exporters) and on TensorRT shape expressions (`TensorDesc.shape_expr[i]`)."""

from __future__ import annotations

from typing import TypeVar

Dim = TypeVar("Dim")


def select_kmax(num_patches: Dim, plus: bool) -> Dim:
    """Padded width of AdaptiveTokenSelect: kept outliers (at most N - 1 - floor(3(N - 1)/4)) plus the extra
    token for PruMerge, i.e. N - floor(3(N - 1)/4); every patch plus the extra token (N + 1) for PruMerge+."""
    if plus:
        return num_patches + 1
    return num_patches - ((num_patches - 1) * 3) // 4


def select_opt(num_patches: Dim) -> Dim:
    """Autotune value of the data-dependent count: a quarter of the patches (the paper's ~144 of 576)."""
    return num_patches // 4
