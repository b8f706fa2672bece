"""The console commands print to: full width when piped (Rich would cut tables at 80 columns)."""

from __future__ import annotations

import shutil
import sys

from rich.console import Console

PIPED_WIDTH = 160


def out_console() -> Console:
    """A console for standard output; piped or redirected output is not cut at 80 columns."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=max(PIPED_WIDTH, shutil.get_terminal_size((PIPED_WIDTH, 24)).columns))
