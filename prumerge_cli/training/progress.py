"""A training run under a progress bar, with the line that says how to go on when it stopped early."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .loop import StepLog, Trainer


def train_with_progress(trainer: Trainer, name: str, columns: str, fields: Callable[[StepLog], dict[str, float]],
                        console: Console, checkpoint_dir: Path,
                        on_step: Callable[[StepLog], None] | None = None) -> list[StepLog]:  # fmt: skip
    """Run `trainer`; the bar shows `columns` (a rich format over `task.fields`) filled from `fields(log)`."""
    main = trainer.rank.main
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn(columns), TimeElapsedColumn(), TimeRemainingColumn(), console=console)  # fmt: skip
    empty = {key: float("nan") for key in fields(StepLog(0, float("nan"), float("nan"), {}))}
    with bar:
        task = bar.add_task(name, total=trainer.options.steps, completed=trainer.start, visible=main, **empty)

        def report(log: StepLog) -> None:
            bar.update(task, completed=log.step + 1, **fields(log))
            if on_step is not None:
                on_step(log)

        history = trainer.run(report)
    if not trainer.finished and main:
        console.print(f"stopped after step {len(history)} of {trainer.options.steps}; the checkpoint is in "
                      f"{checkpoint_dir}: rerun with --resume")  # fmt: skip
    return history
