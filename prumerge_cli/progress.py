"""Progress of a long command, phase by phase: on a terminal a bar per phase with its count, elapsed time and ETA;
where the output is a log (not a terminal), a line as each phase starts and one a minute while it runs. Either way
a line when a phase ends, with its elapsed time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOG_EVERY_S = 60.0
"""Seconds between the lines a long phase prints to a log."""

Advance = Callable[..., None]
"""Called with the steps done since the last call (default 1)."""


def format_seconds(seconds: float) -> str:
    """`42.0 s`, `3.5 min`, `1.2 h`."""
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Phases:
    """The progress display of one command; `phase` opens each phase in turn."""

    def __init__(self, console: Console, log_every: float = LOG_EVERY_S):
        self.console, self.log_every = console, log_every
        self.bar: Progress | None = None
        self.began = time.perf_counter()

    def __enter__(self) -> Phases:
        if self.console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=self.console, transient=True)  # fmt: skip
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    @contextlib.contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Advance]:
        """A phase of `total` steps (None: unknown); yields the function that counts steps done."""
        start = time.perf_counter()
        done = 0
        last_line = start
        task = self.bar.add_task(name, total=total) if self.bar is not None else None
        if self.bar is None:
            self.console.print(f"{name}{f' ({total} steps)' if total else ''}...", highlight=False)

        def advance(steps: int = 1) -> None:
            nonlocal done, last_line
            done += steps
            if self.bar is not None:
                self.bar.update(task, completed=done)  # type: ignore[arg-type]
                return
            now = time.perf_counter()
            if now - last_line >= self.log_every:
                last_line = now
                left = f", about {format_seconds((now - start) * (total - done) / done)} left" if total else ""
                self.console.print(f"  {name}: {done}{f'/{total}' if total else ''} after "
                                   f"{format_seconds(now - start)}{left}", highlight=False)  # fmt: skip

        yield advance
        elapsed = time.perf_counter() - start
        if self.bar is not None:
            self.bar.remove_task(task)  # type: ignore[arg-type]
        self.console.print(f"{name}: done in {format_seconds(elapsed)}", highlight=False)

    def total(self) -> str:
        """The time since the display was made, e.g. `4.7 min`."""
        return format_seconds(time.perf_counter() - self.began)


def phase_of(phases: Phases | None, name: str, total: int | None = None) -> contextlib.AbstractContextManager[Advance]:
    """`phases.phase(name, total)`, or a phase that shows nothing where there is no display."""
    if phases is None:
        return contextlib.nullcontext(lambda steps=1: None)
    return phases.phase(name, total)
