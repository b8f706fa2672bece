"""Peak memory of one call: CUDA peak allocated on a GPU, else the process's peak RSS (Linux)."""

from __future__ import annotations

import resource
from collections.abc import Callable
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (writing 5 to clear_refs); False where that is not possible."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict[str, float | str]:
    """Run `fn` once and report its peak memory in MiB, and what was measured: CUDA's allocator for a run on a
    CUDA device, the process's resident memory for a CPU run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"kind": "cuda_peak_allocated", "peak_mib": peak / 2**20, "increase_mib": (peak - before) / 2**20}
    per_call = _reset_peak_rss()
    before = _status_kib("VmRSS") or 0
    fn()
    peak = _status_kib("VmHWM") if per_call else None
    if peak is None:  # no per-call mark: the process-wide maximum
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kind = "process_peak_rss" if per_call else "process_max_rss_since_start"
    return {"kind": kind, "peak_mib": peak / 1024, "increase_mib": max(0, peak - before) / 1024}
