"""The reducer interface and its output type."""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import PrumergeError

EXTRA_INDEX = -1
"""`indices` value of the merged "extra" token (the attention-weighted sum of pruned patches)."""

PAD_INDEX = -2
"""`indices` value of a padding slot (beyond `lengths[b]`); its token is all zeros."""


@dataclass
class ReducedTokens:
    """Reduced visual tokens, left-aligned and zero-padded to the batch's largest count.

    tokens:     [B, Kmax, C] features (or projector outputs).
    lengths:    [B] int64, valid tokens per row.
    indices:    [B, Kmax] int64, the patch index of each token, `EXTRA_INDEX` or `PAD_INDEX`.
    neighbours: optional [B, Kmax, knn] int64, the patches merged into each token (-1 where none).
    span:       the full image's patch count when the LM places each token at its patch's position
                (`positions=original`, see `lm.positions`); None for contiguous positions.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    indices: torch.Tensor
    neighbours: torch.Tensor | None = None
    span: int | None = None

    @property
    def mask(self) -> torch.Tensor:
        """[B, Kmax] bool, True on valid tokens."""
        return torch.arange(self.tokens.shape[1], device=self.lengths.device) < self.lengths[:, None]

    def select(self, rows: torch.Tensor) -> ReducedTokens:
        """The batch rows `rows` (int64 [R], repeats allowed), in that order."""
        nb = None if self.neighbours is None else self.neighbours[rows]
        return ReducedTokens(self.tokens[rows], self.lengths[rows], self.indices[rows], nb, self.span)

    def row(self, b: int) -> ReducedTokens:
        """Row b alone, trimmed to its length (a batch of one)."""
        n = int(self.lengths[b])
        nb = None if self.neighbours is None else self.neighbours[b : b + 1, :n]
        return ReducedTokens(
            self.tokens[b : b + 1, :n], self.lengths[b : b + 1], self.indices[b : b + 1, :n], nb, self.span
        )


@dataclass
class TowerSignals:
    """What the vision tower hands a reducer.

    features: [B, N, C] selected patch features (CLS removed).
    scores:   [B, N] importance of each patch (CLS attention, or mean received attention), or None.
    keys:     [B, N, C] key projections of the score layer, or None.
    grid:     (rows, cols) of the patch grid.
    """

    features: torch.Tensor
    scores: torch.Tensor | None
    keys: torch.Tensor | None
    grid: tuple[int, int]


class Reducer(abc.ABC):
    """A named map from `TowerSignals` to `ReducedTokens`; subclasses are dataclasses of their parameters."""

    name: ClassVar[str]
    needs_scores: ClassVar[bool] = False
    bound_rule: ClassVar[str]
    """Why `max_tokens` bounds the output (recorded in export manifests)."""

    def __call__(self, signals: TowerSignals) -> ReducedTokens:
        """Reduce a batch."""
        check_finite(signals.features)
        return self.reduce(signals)

    @abc.abstractmethod
    def reduce(self, signals: TowerSignals) -> ReducedTokens:
        """Reduce a batch whose features are known to be finite."""

    @abc.abstractmethod
    def max_tokens(self, num_patches: int) -> int:
        """Proven upper bound on the output count for a tower with `num_patches` patches."""

    def for_export(self, num_patches: int) -> Reducer:
        """An equivalent reducer whose output shapes are static for `num_patches` (no host reads)."""
        return self

    def params(self) -> dict[str, Any]:
        """The reducer's parameters, JSON-serialisable."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def check_finite(features: torch.Tensor) -> None:
    """Raise a clear error on NaN or Inf features instead of returning garbage selections."""
    if not bool(torch.isfinite(features).all()):
        raise PrumergeError("vision features contain NaN or Inf; check the input images and the model weights")
