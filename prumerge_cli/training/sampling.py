"""What each training step sees, as a function of the seed and the sample's place in the run only: the data
order, and the Gumbel noise of every sample. So a run gives the same result on one process, on N processes
under `torchrun`, or with gradient accumulation, and after a resume."""

from __future__ import annotations

import math

import torch

from .distributed import Rank


def temperature(step: int, steps: int) -> float:
    """Gumbel temperature: 0.1 ** (step / steps), from 1 down to 0.1."""
    return 0.1 ** (step / steps)


def learning_rate_scale(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up then cosine decay."""
    ramp = max(1, int(steps * warmup))
    return min(1.0, (step + 1) / ramp) * 0.5 * (1 + math.cos(math.pi * step / steps))


def sample_positions(step: int, micro: int, size: int, accumulation: int, rank: Rank) -> list[int]:
    """Places in the run of this rank's share of micro-batch `micro` of global step `step`: a global step is
    `size * world * accumulation` samples; within a micro-batch the ranks are interleaved."""
    first = (step * accumulation + micro) * size * rank.world
    return [first + j for j in range(rank.rank, size * rank.world, rank.world)]


def example_index(position: int, examples: int, seed: int) -> int:
    """The example at `position`: a seeded reshuffle per epoch."""
    epoch, offset = divmod(position, examples)
    return int(torch.randperm(examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))[offset])


def gumbel_noise(seed: int, position: int, image_tokens: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel(0, 1) draws `[image_tokens, 2]` and `[length, 2]` of the sample at `position` (CPU, fp32)."""
    generator = torch.Generator().manual_seed(seed * 2**32 + position)
    draws = torch.empty(image_tokens + length, 2).exponential_(generator=generator)
    noise = -draws.log()
    return noise[:image_tokens], noise[image_tokens:]
