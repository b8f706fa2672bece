"""Score-free baselines: keep everything, a seeded random subset, or 2-D average pooling."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import PrumergeError
from .base import ReducedTokens, Reducer, TowerSignals


def _full_lengths(tokens: torch.Tensor) -> torch.Tensor:
    return torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)


@dataclass
class NoReduction(Reducer):
    """Every patch, in raster order (the unreduced baseline)."""

    name: ClassVar[str] = "none"
    bound_rule: ClassVar[str] = "every patch"

    def reduce(self, signals: TowerSignals) -> ReducedTokens:
        x = signals.features
        idx = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        return ReducedTokens(x, _full_lengths(x), idx)

    def max_tokens(self, num_patches: int) -> int:
        return num_patches


@dataclass
class RandomSubset(Reducer):
    """`budget` patches drawn uniformly without replacement, in raster order. The subset depends only on
    the seed (the same for every image), so results do not depend on batch composition."""

    name: ClassVar[str] = "random"
    bound_rule: ClassVar[str] = "the budget"
    budget: int = 72
    seed: int = 0

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise PrumergeError(f"budget must be >= 1, got {self.budget}")

    def reduce(self, signals: TowerSignals) -> ReducedTokens:
        x = signals.features
        n = x.shape[1]
        chosen = sorted(random.Random(self.seed).sample(range(n), min(self.budget, n)))
        idx = torch.tensor(chosen, device=x.device)  # a constant: exports as one, never as an RNG op
        tokens = x[:, idx]
        return ReducedTokens(tokens, _full_lengths(tokens), idx.expand(x.shape[0], -1))

    def max_tokens(self, num_patches: int) -> int:
        return min(self.budget, num_patches)


@dataclass
class GridPool(Reducer):
    """2-D average pooling of the patch grid to `side` x `side` tokens; a token's index is the patch at the
    centre of its window."""

    name: ClassVar[str] = "pool"
    bound_rule: ClassVar[str] = "side x side pooled tokens"
    side: int = 12

    def __post_init__(self) -> None:
        if self.side < 1:
            raise PrumergeError(f"side must be >= 1, got {self.side}")

    def reduce(self, signals: TowerSignals) -> ReducedTokens:
        x = signals.features
        rows, cols = signals.grid
        side_r, side_c = min(self.side, rows), min(self.side, cols)
        image = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], rows, cols)
        pooled = F.adaptive_avg_pool2d(image.float(), (side_r, side_c)).to(x.dtype)
        tokens = pooled.flatten(2).transpose(1, 2)
        r = torch.tensor([_window_centre(i, side_r, rows) for i in range(side_r)])
        c = torch.tensor([_window_centre(i, side_c, cols) for i in range(side_c)])
        idx = (r[:, None] * cols + c[None, :]).flatten().to(x.device).expand(x.shape[0], -1)
        return ReducedTokens(tokens, _full_lengths(tokens), idx)

    def max_tokens(self, num_patches: int) -> int:
        side = math.isqrt(num_patches)
        return min(self.side, side) ** 2


def _window_centre(i: int, out: int, size: int) -> int:
    """Centre of adaptive-pooling window i of `out` over `size` cells."""
    start, end = (i * size) // out, -((-(i + 1) * size) // out)
    return (start + end - 1) // 2
