"""PruMerge, PruMerge+ and the fixed-budget top-k reducer, with the official semantics at batch size 1."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..errors import PrumergeError
from .assemble import assemble, trim
from .base import ReducedTokens, Reducer, TowerSignals
from .selection import grid_mask, iqr_outlier_mask, max_outliers, order_centres

Order = Literal["official", "raster"]


@dataclass
class _ScoreReducer(Reducer):
    """Shared parameters of the reducers that select by score and merge by key similarity."""

    needs_scores: ClassVar[bool] = True

    knn: int = 32
    merge: bool = True
    order: Order = "official"

    def __post_init__(self) -> None:
        if self.knn < 1:
            raise PrumergeError(f"knn must be >= 1, got {self.knn}")
        if self.order not in ("official", "raster"):
            raise PrumergeError(f"order must be 'official' or 'raster', got {self.order!r}")


@dataclass
class PruMerge(_ScoreReducer):
    """Adaptive selection: keep the patches whose score is an IQR outlier (per sample), merge the rest."""

    name: ClassVar[str] = "prumerge"
    bound_rule: ClassVar[str] = (
        "outliers lie strictly above Q3, so at most N - 1 - floor(3(N - 1) / 4) patches (144 of 576, or cap), "
        "plus the extra token"
    )
    iqr_k: float = 1.5
    cap: int | None = None
    """Static bound on kept outliers (export mode: fixed shapes, no host read); None sizes from the batch."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iqr_k < 0:
            raise PrumergeError(f"iqr_k must be >= 0, got {self.iqr_k}")
        if self.cap is not None and self.cap < 0:
            raise PrumergeError(f"cap must be >= 0, got {self.cap}")

    def kept_bound(self, num_patches: int) -> int:
        """Upper bound on kept outliers: at most a quarter of the patches lie above Q3 (144 of 576)."""
        bound = max_outliers(num_patches)
        return bound if self.cap is None else min(self.cap, bound)

    def _centres(self, signals: TowerSignals, counts: torch.Tensor, extra: torch.Tensor | None):
        assert signals.scores is not None
        n = signals.features.shape[1]
        cap = self.kept_bound(n) if self.cap is not None else int(counts.max())
        centre_idx, valid = order_centres(signals.scores, counts, cap, extra, raster=self.order == "raster")
        return (centre_idx, valid) if self.cap is not None else trim(centre_idx, valid)

    def for_export(self, num_patches: int) -> PruMerge:
        return dataclasses.replace(self, cap=self.kept_bound(num_patches))

    def outlier_counts(self, scores: torch.Tensor) -> torch.Tensor:
        """[B] int64 kept-outlier count per sample, clamped to `cap` if set."""
        counts = iqr_outlier_mask(scores, self.iqr_k).sum(-1)
        return counts if self.cap is None else counts.clamp(max=self.cap)

    def reduce(self, signals: TowerSignals) -> ReducedTokens:
        assert signals.scores is not None
        counts = self.outlier_counts(signals.scores)
        centre_idx, valid = self._centres(signals, counts, None)
        return assemble(signals, centre_idx, valid, self.merge, self.knn)

    def max_tokens(self, num_patches: int) -> int:
        return self.kept_bound(num_patches) + int(self.merge)


@dataclass
class PruMergePlus(PruMerge):
    """PruMerge plus spatial samples: a raster grid of stride (N // k) // grid_div, appended after the
    outliers. With no outlier at all (where the official code divides by zero) only the extra token is
    returned, with a warning."""

    name: ClassVar[str] = "prumerge+"
    bound_rule: ClassVar[str] = (
        "max over outlier counts k of k + ceil(grid_end / stride(k)), at most all N patches, plus the extra token"
    )
    grid_div: int = 3
    grid_end: int | None = None
    """Grid stops before this patch index; None means N - 1 (575 for 576 patches), as the official code."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid_div < 1:
            raise PrumergeError(f"grid_div must be >= 1, got {self.grid_div}")

    def reduce(self, signals: TowerSignals) -> ReducedTokens:
        assert signals.scores is not None
        counts = self.outlier_counts(signals.scores)
        n = signals.features.shape[1]
        if self.cap is None and bool((counts == 0).any()):
            warnings.warn("prumerge+: an image has no outlier token; it keeps only the extra token", stacklevel=2)
        grid = grid_mask(counts, n, self.grid_div, self._grid_end(n))
        centre_idx, valid = self._centres(signals, counts, grid)
        return assemble(signals, centre_idx, valid, self.merge, self.knn)

    def _grid_end(self, n: int) -> int:
        return n - 1 if self.grid_end is None else self.grid_end

    def max_tokens(self, num_patches: int) -> int:
        end = self._grid_end(num_patches)
        strides = ((k, max(1, (num_patches // k) // self.grid_div)) for k in range(1, self.kept_bound(num_patches) + 1))
        bound = max((k + -(-end // stride) for k, stride in strides), default=0)
        return min(bound, num_patches) + int(self.merge)


@dataclass
class TopK(_ScoreReducer):
    """Fixed budget: the `budget` highest-scoring patches (default int(N·ratio)); merge on or off."""

    name: ClassVar[str] = "topk"
    bound_rule: ClassVar[str] = "the budget, plus the extra token when merging"
    budget: int | None = None
    ratio: float = 0.125

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None and self.budget < 1:
            raise PrumergeError(f"budget must be >= 1, got {self.budget}")
        if not 0 < self.ratio <= 1:
            raise PrumergeError(f"ratio must be in (0, 1], got {self.ratio}")

    def kept(self, num_patches: int) -> int:
        """Number of patches kept for a tower of `num_patches`."""
        k = self.budget if self.budget is not None else int(num_patches * self.ratio)
        return max(1, min(k, num_patches))

    def reduce(self, signals: TowerSignals) -> ReducedTokens:
        assert signals.scores is not None
        batch, n = signals.scores.shape
        k = self.kept(n)
        counts = torch.full((batch,), k, dtype=torch.long, device=signals.scores.device)
        centre_idx, valid = order_centres(signals.scores, counts, k, None, raster=self.order == "raster")
        return assemble(signals, centre_idx, valid, self.merge, self.knn)

    def max_tokens(self, num_patches: int) -> int:
        return self.kept(num_patches) + int(self.merge)
