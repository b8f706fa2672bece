"""The embedded world as lmms-eval tasks: held-out images and their questions written in a `load_from_disk`
layout (one split per question type), beside the task files shipped in `tasks/` with their dataset path filled in,
so that `--include_path DIR` finds the group `prumerge_world` and one subtask per question type."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import atomic
from ..zoo.world import QUESTION_TYPES, fingerprint, samples_of

GROUP = "prumerge_world"
TEMPLATES = Path(__file__).resolve().parent / "tasks"
MAX_NEW_TOKENS = 16
"""Room for the longest reply the world asks for (a count with its steps) and its end."""


def subtasks() -> list[str]:
    """The task names of the group, one per question type."""
    return [f"{GROUP}_{kind}" for kind in QUESTION_TYPES]


def write_world_tasks(out: Path, split: str = "test", images: int = 200, force: bool = False) -> Path:
    """Write the first `images` samples of `split` and the task files to `out` (atomically); returns `out`, the
    directory to pass as `--include_path`."""
    from datasets import Dataset, DatasetDict, Features, Image, Value
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # prumerge reports the phase

    atomic.check_output(out, force)
    samples = samples_of(split, 0, images)
    features = Features({"question_id": Value("string"), "image_index": Value("int32"), "image": Image(),
                         "question": Value("string"), "answer": Value("string"), "reply": Value("string")})  # fmt: skip
    by_kind: dict[str, list[dict]] = {kind: [] for kind in QUESTION_TYPES}
    for i, sample in enumerate(samples):
        for j, qa in enumerate(sample.qas):
            by_kind[qa.kind].append({"question_id": f"{split}-{i}-{j}", "image_index": i, "image": sample.image,
                                     "question": qa.question, "answer": qa.answer, "reply": qa.reply})  # fmt: skip
    final = out.resolve()
    with atomic.atomic_dir(out, force) as tmp:
        DatasetDict({k: Dataset.from_list(rows, features=features) for k, rows in by_kind.items()}).save_to_disk(
            str(tmp / "data")
        )
        template = (TEMPLATES / "subtask.yaml.template").read_text()
        for kind in QUESTION_TYPES:
            text = template.format(kind=kind, data=final / "data", max_new_tokens=MAX_NEW_TOKENS)
            (tmp / f"{GROUP}_{kind}.yaml").write_text(text)
        tasks = "\n".join(f"  - {name}" for name in subtasks())
        (tmp / f"{GROUP}.yaml").write_text((TEMPLATES / "group.yaml.template").read_text().format(tasks=tasks))
        shutil.copy(TEMPLATES / "utils.py", tmp / "utils.py")
    return out


def cache_dir() -> Path:
    """Where written world tasks are kept: `$PRUMERGE_CACHE/lmms-world` (default ~/.cache/prumerge)."""
    return Path(os.environ.get("PRUMERGE_CACHE", Path.home() / ".cache" / "prumerge")) / "lmms-world"


def cached_world_tasks(split: str = "test", images: int = 200) -> Path:
    """The world tasks of `split` and `images` in the user's cache, written on first use (a new world: anew)."""
    out = cache_dir() / f"{split}-{images}-{fingerprint(lessons=True)[:12]}"
    if not (out / f"{GROUP}.yaml").is_file():
        write_world_tasks(out, split, images, force=True)
    return out
