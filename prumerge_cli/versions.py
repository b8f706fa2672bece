"""Versions of the packages that shape results, for manifests and reports."""

from __future__ import annotations

from importlib import metadata


def package_versions(*extra: str) -> dict[str, str]:
    """Installed versions of prumerge, torch, transformers and any `extra` packages present."""
    out: dict[str, str] = {}
    for name in ("prumerge", "torch", "transformers", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
