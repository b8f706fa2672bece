"""`prumerge eval`: a bundle scored by lmms-eval through its Python API (offline unless asked), beside the same
model with every token if asked, with the visual tokens it kept, versions and machine, in one report."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PrumergeError
from .world_tasks import GROUP, cached_world_tasks, subtasks


@dataclass(frozen=True)
class EvalSettings:
    """What to run: tasks, how many documents of each (None: all), world images, batch, device, network."""

    tasks: tuple[str, ...]
    limit: int | None = None
    world_images: int = 200
    batch_size: int = 8
    device: str = "cpu"
    online: bool = False


def require_lmms_eval() -> None:
    """A clear error where lmms-eval is not installed."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise PrumergeError("lmms-eval is not installed: `make setup` installs it here; elsewhere "
                            "pip install 'prumerge[eval]'")  # fmt: skip


def go_offline(online: bool) -> None:
    """No hub access unless `online`; Hugging Face caches under the user's prumerge cache unless set."""
    if not online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HOME", str(Path.home() / ".cache" / "prumerge" / "huggingface"))


def quiet_lmms_eval() -> None:
    """lmms-eval's log (loguru, DEBUG by default) down to its errors: prumerge reports the phases."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="ERROR")


def task_manager(tasks: tuple[str, ...], world_images: int):
    """An lmms-eval task manager that knows `tasks`: the world's from their written directory (the built-in
    index of about 1,400 task files is skipped when only world tasks are asked for)."""
    from lmms_eval.tasks import TaskManager

    world = {GROUP, *subtasks()}
    include = str(cached_world_tasks("test", world_images)) if world & set(tasks) else None
    manager = TaskManager(verbosity="ERROR", include_path=include, include_defaults=not set(tasks) <= world)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise PrumergeError(f"unknown task {', '.join(unknown)}; e.g. {GROUP} or {', '.join(subtasks()[:2])}")
    return manager


def score(bundle: Path, settings: EvalSettings, manager: Any, every_token: bool = False) -> dict[str, Any]:
    """lmms-eval's results for the bundle (or its model with every token), and the visual tokens it kept."""
    from lmms_eval.evaluator import simple_evaluate

    from .lmms_model import PrumergeLmms

    model = PrumergeLmms(str(bundle), settings.device, settings.batch_size, every_token=every_token)
    with contextlib.redirect_stderr(io.StringIO()):  # lmms-eval's per-task bars; prumerge reports the phases
        found = simple_evaluate(model=model, tasks=list(settings.tasks), limit=settings.limit, task_manager=manager,
                                log_samples=False, verbosity="ERROR", bootstrap_iters=0)  # fmt: skip
    if not found or "results" not in found:
        raise PrumergeError("lmms-eval returned no results")
    tokens = model.visual_tokens
    return {"results": found["results"], "groups": found.get("groups", {}), "n-samples": found.get("n-samples", {}),
            "visual_tokens": {"mean": sum(tokens) / len(tokens), "min": min(tokens), "max": max(tokens),
                              "requests": len(tokens)}}  # fmt: skip


def headline(results: dict[str, Any]) -> dict[str, float]:
    """Task -> its main score (the first numeric metric lmms-eval reports, e.g. `accuracy,none`)."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," in key and not key.endswith("_stderr,none") and isinstance(value, (int, float)):
                out[task] = float(value)
                break
    return out
