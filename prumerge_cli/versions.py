"""Versions of the packages, and the CPU, that shape results, for manifests and reports."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path


def package_versions(*extra: str) -> dict[str, str]:
    """Installed versions of prumerge, torch, transformers and any `extra` packages present."""
    out: dict[str, str] = {}
    for name in ("prumerge", "torch", "transformers", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def cpu_name() -> str:
    """The CPU's model name where the OS tells it (Linux), else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0]}, {len(names)} logical CPUs" if names else platform.processor() or platform.machine()
