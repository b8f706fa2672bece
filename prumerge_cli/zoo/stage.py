"""Resumable training for the stages of `make zoo`: a run checkpoints its model, optimizer, scheduler and step to a
cache outside the repository every few minutes and resumes from there when rerun, so a build cut short loses at
most that much. A checkpoint of another recipe is deleted, never resumed."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from ..errors import PrumergeError
from ..training.checkpoints import STATE, load_checkpoint, save_checkpoint

CACHE_DIR = Path(os.environ.get("PRUMERGE_CACHE", Path.home() / ".cache" / "prumerge")) / "zoo"
CHECKPOINT_MINUTES = 5.0
"""At most this long between checkpoints (half the 10 minutes a build may lose)."""


@dataclass
class TrainingRun:
    """A model in training: `step(i)` runs optimisation step i (its data depends on i only) and returns the loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: Callable[[int], float]
    steps: int

    def run(self, log: Callable[[int, float], None] | None = None) -> nn.Module:
        """Every step from the first, without checkpoints; the model in eval mode."""
        for i in range(self.steps):
            loss = self.step(i)
            if log is not None:
                log(i, loss)
        return self.model.eval()


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """5% linear warm-up, then cosine decay to zero at `steps`."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


@dataclass
class StageProgress:
    """Where a resumable run ended: finished or stopped, and its training minutes summed over every session."""

    finished: bool
    minutes: float


def run_resumable(
    run: TrainingRun,
    directory: Path,
    recipe: dict[str, Any],
    console: Console,
    log: Callable[[int, float], None] | None = None,
    stop_after: int | None = None,
    every_minutes: float = CHECKPOINT_MINUTES,
    deadline: float | None = None,
) -> StageProgress:
    """Train from the checkpoint in `directory` (if it was written for `recipe`) to the end, checkpointing every
    `every_minutes` and at the end; checkpoint and stop after `stop_after` steps of this call, or after the first
    step that ends past `deadline` (a `time.perf_counter()` value)."""
    start, minutes = resume(run, directory, recipe, console)
    began = last = time.perf_counter()
    for i in range(start, run.steps):
        loss = run.step(i)
        if log is not None:
            log(i, loss)
        now = time.perf_counter()
        done = i + 1 == run.steps
        late = deadline is not None and now >= deadline
        stopping = not done and (late or (stop_after is not None and i + 1 - start >= stop_after))
        if done or stopping or now - last >= 60 * every_minutes:
            save(run, directory, recipe, i + 1, minutes + (now - began) / 60)
            last = now
        if stopping:
            return StageProgress(False, minutes + (now - began) / 60)
    run.model.eval()
    return StageProgress(True, minutes + (time.perf_counter() - began) / 60)


def save(run: TrainingRun, directory: Path, recipe: dict[str, Any], step: int, minutes: float) -> None:
    """Checkpoint `run` after `step` steps."""
    weights = {k: v.detach().contiguous() for k, v in run.model.state_dict().items()}
    state = {"settings": recipe, "step": step, "minutes": minutes, "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "rng": torch.get_rng_state()}  # fmt: skip
    save_checkpoint(directory, weights, state)


def checkpoint_step(directory: Path, settings: dict[str, Any]) -> int:
    """The step of the checkpoint in `directory` if it was written for `settings`, else 0."""
    state = directory / STATE
    if not state.is_file():
        return 0
    saved = torch.load(state, weights_only=True)
    return int(saved["step"]) if saved.get("settings") == settings else 0


def resume(run: TrainingRun, directory: Path, recipe: dict[str, Any], console: Console) -> tuple[int, float]:
    """Load the checkpoint into `run`: (its step, its minutes), or (0, 0) without a usable one."""
    if not directory.is_dir():
        return 0, 0.0
    try:
        weights, state = load_checkpoint(directory, recipe)
    except PrumergeError as exc:
        console.print(f"not resuming from {directory}: {exc}; starting over")
        shutil.rmtree(directory)
        return 0, 0.0
    run.model.load_state_dict(weights)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    console.print(f"resuming from {directory} at step {state['step']} of {run.steps}")
    return int(state["step"]), float(state["minutes"])
