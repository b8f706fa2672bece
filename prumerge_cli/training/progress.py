"""A training run under a progress bar, with the line that says how to go on when it stopped early."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..progress import LOG_EVERY_S, format_seconds
from .loop import StepLog, Trainer


def train_with_progress(trainer: Trainer, name: str, columns: str, fields: Callable[[StepLog], dict[str, float]],
                        console: Console, checkpoint_dir: Path,
                        on_step: Callable[[StepLog], None] | None = None) -> list[StepLog]:  # fmt: skip
    """Run `trainer`; the bar shows `columns` (a rich format over `task.fields`) filled from `fields(log)`. Where
    the console is no terminal (a log), a line a minute says the step, the fields and the time left instead."""
    main = trainer.rank.main
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn(columns), TimeElapsedColumn(), TimeRemainingColumn(), console=console)  # fmt: skip
    empty = {key: float("nan") for key in fields(StepLog(0, float("nan"), float("nan"), {}))}
    with bar:
        task = bar.add_task(name, total=trainer.options.steps, completed=trainer.start, visible=main, **empty)

        began, last_line = time.perf_counter(), time.perf_counter()

        def report(log: StepLog) -> None:
            nonlocal last_line
            bar.update(task, completed=log.step + 1, **fields(log))
            now, done, total = time.perf_counter(), log.step + 1, trainer.options.steps
            if main and not console.is_terminal and (now - last_line >= LOG_EVERY_S or done == total):
                last_line, ran = now, done - trainer.start
                shown = ", ".join(f"{k} {v:.3f}" for k, v in fields(log).items())
                left = format_seconds((now - began) * (total - done) / ran)
                console.print(f"{name}: step {done}/{total}, {shown}, {format_seconds(now - began)}, about {left} left",
                              highlight=False)  # fmt: skip
            if on_step is not None:
                on_step(log)

        history = trainer.run(report)
    if not trainer.finished and main:
        console.print(f"stopped after step {len(history)} of {trainer.options.steps}; the checkpoint is in "
                      f"{checkpoint_dir}: rerun with --resume")  # fmt: skip
    return history
