"""Interleaved timing of alternatives, so that machine noise hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Latency:
    """Seconds per call: median, 10th and 90th percentiles over the measured rounds."""

    p50: float
    p90: float
    samples: int
    p10: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ordered = sorted(seconds)
        at = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
        return cls(statistics.median(ordered), at(0.9), len(ordered), at(0.1))


def interleaved(
    fns: dict[str, Callable[[], object]],
    iters: int,
    warmup: int = 1,
    on_round: Callable[[], None] | None = None,
) -> dict[str, Latency]:
    """Time each function round-robin: `warmup` discarded rounds, then `iters` measured ones."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
        if on_round is not None:
            on_round()
    return {name: Latency.of(samples) for name, samples in times.items()}
