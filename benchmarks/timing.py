"""Interleaved timing of alternatives, so machine noise hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], iters: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin after `warmup` discarded rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return times


def median_ms(samples: list[float]) -> float:
    """Median in milliseconds."""
    return 1000 * statistics.median(samples)
