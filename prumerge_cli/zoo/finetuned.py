"""The embedded LLaVA fine-tuned with each reducer active (PruMerge's regime), one bundle per method in
`prumerge_cli/zoo/finetuned/`: prumerge, prumerge+, and random and pool at each one's token budget, all with
the same recipe and steps. Each bundle is written as soon as its run ends and kept on a rerun while the recipe
stays; runs checkpoint to a cache outside the repository and resume from it.
Usage: python -m prumerge_cli.zoo.finetuned [--force]"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from .. import atomic
from ..bundle import is_bundle, load, read_bundle
from ..cli import quiet_transformers
from ..demo import fixed_budget_params
from ..encoder import ReducedVisionEncoder
from ..errors import PrumergeError
from ..finetune.compress import FinetuneJob, run_finetune
from ..finetune.lora import LoraSettings
from ..lm.llava_lm import LlavaLm
from ..training.loop import StepLog, TrainOptions
from . import FINETUNED_DIR, LLAVA_DIR
from .llava_json import DATA_FILE, write_llava_json
from .precision import resolve
from .vqa import vqa_accuracy
from .world import fingerprint

CACHE_DIR = Path(os.environ.get("PRUMERGE_CACHE", Path.home() / ".cache" / "prumerge")) / "zoo-finetune"


@dataclass(frozen=True)
class FinetuneRecipe:
    """One recipe for every method: LoRA sized for the 256-wide LM, steps, batch, rates, data, seed."""

    steps: int = 2400
    batch_size: int = 8
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lr: float = 1e-3
    projector_lr: float = 1e-4
    conversations: int = 3200
    seed: int = 0
    save_every: int = 50
    budget_images: int = 200
    """Validation images over which PruMerge's and PruMerge+'s mean token counts are taken as the baselines'
    budgets (the test split is kept for the figures reported)."""
    precision: str = "auto"
    """bf16 autocast where the CPU has native bf16 (the frozen LM held in bf16), fp32 elsewhere."""


def methods(budget_images: int = 200) -> dict[str, tuple[str, dict[str, Any]]]:
    """Bundle name -> (method, parameters): prumerge and prumerge+, and random and pool at each one's mean token
    count on the first `budget_images` of the val split (`-plus`: at prumerge+'s)."""
    lm = LlavaLm.from_pretrained(LLAVA_DIR)
    chosen: dict[str, tuple[str, dict[str, Any]]] = {}
    for method, suffix in (("prumerge", ""), ("prumerge+", "-plus")):
        encoder = ReducedVisionEncoder.from_pretrained(LLAVA_DIR, method)
        budget = fixed_budget_params(vqa_accuracy(encoder, lm, split="val", images=budget_images).tokens_mean)
        chosen |= {method: (method, {}), f"random{suffix}": ("random", budget["random"]),
                   f"pool{suffix}": ("pool", budget["pool"])}  # fmt: skip
    return chosen


def up_to_date(bundle: Path, recipe: FinetuneRecipe | None = None) -> bool:
    """Whether `bundle` exists and was trained on the LLaVA there is now (and, given `recipe`, with it)."""
    try:
        load(bundle)
    except PrumergeError:
        return False
    return recipe is None or trained_with(read_bundle(bundle).get("finetune") or {}) == trained_with(recipe)


def trained_with(source: FinetuneRecipe | dict[str, Any]) -> tuple[Any, ...]:
    """The recipe settings a bundle's `finetune` record shows: steps, batch, rates, LoRA size, data size, seed."""
    if isinstance(source, FinetuneRecipe):
        return (source.steps, source.batch_size, source.lr, source.projector_lr, source.lora_rank,
                float(source.lora_alpha), source.conversations, source.seed)  # fmt: skip
    lora = source.get("lora") or {}
    return (source.get("steps"), source.get("batch_size"), source.get("lr"), source.get("projector_lr"),
            lora.get("rank"), float(lora.get("alpha", 0)), source.get("examples"), source.get("seed"))  # fmt: skip


def drop_stale(directory: Path, console: Console) -> None:
    """Remove the bundles in `directory` that were not trained on the LLaVA there is now (it was retrained)."""
    for bundle in sorted(p for p in directory.iterdir() if is_bundle(p)):
        if not up_to_date(bundle):
            shutil.rmtree(bundle)
            console.print(f"finetuned: removed {bundle}, trained on the previous LLaVA")


def make_portable(bundle: Path) -> None:
    """Drop the building machine's paths from a committed bundle: the model's absolute path in `reducer.json` (the
    relative one finds it in any checkout) and PEFT's `base_model_name_or_path`, which becomes that relative path."""
    record_file, adapter_file = bundle / "reducer.json", bundle / "adapter" / "adapter_config.json"
    record = json.loads(record_file.read_text())
    record["model"].pop("absolute_path", None)
    atomic.write_text(record_file, json.dumps(record, indent=2) + "\n")
    adapter = json.loads(adapter_file.read_text())
    adapter["base_model_name_or_path"] = record["model"]["path"]
    atomic.write_text(adapter_file, json.dumps(adapter, indent=2, sort_keys=True) + "\n")


class OutOfTime(Exception):
    """The build's deadline passed; raised right after a checkpoint, so nothing trained is lost."""


def stop_at_checkpoint_after(deadline: float | None, options: TrainOptions) -> Callable[[StepLog], None] | None:
    """A step hook that stops the run at its first checkpoint past `deadline` (a `time.perf_counter` time)."""
    if deadline is None:
        return None

    def check(log: StepLog) -> None:
        done = log.step + 1
        if done % options.save_every == 0 and done < options.steps and time.perf_counter() >= deadline:
            raise OutOfTime(f"checkpointed at step {done}")

    return check


def fine_tune(job: FinetuneJob, console: Console, on_step: Callable[[StepLog], None] | None) -> list[StepLog]:
    """`run_finetune`, starting the method over where its checkpoint is of another recipe."""
    try:
        return run_finetune(job, console, on_step)
    except PrumergeError as exc:
        if not job.resume:
            raise
        console.print(f"{job.method}: not resuming ({exc}); starting over")
        return run_finetune(replace(job, resume=False), console, on_step)


def build_finetuned(
    recipe: FinetuneRecipe,
    console: Console,
    force: bool = False,
    stop_after: int | None = None,
    deadline: float | None = None,
    out: Path = FINETUNED_DIR,
    cache: Path = CACHE_DIR,
) -> bool:
    """Fine-tune every method that has no bundle of this recipe yet (all with `force`) into `out`, checkpointing
    to `cache`. A method stops at a checkpoint after `stop_after` steps of this call or at its first checkpoint
    past `deadline` (a `time.perf_counter` time); then the rest wait. Returns whether every bundle is written."""
    data_dir = cache / f"train-{recipe.conversations}-{fingerprint(lessons=True)[:12]}"  # a new world: new data
    if not (data_dir / DATA_FILE).is_file():
        console.print(f"writing {recipe.conversations} training conversations to {data_dir}")
        write_llava_json(data_dir, "train", recipe.conversations, force=True)
    options = TrainOptions(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                           projector_lr=recipe.projector_lr, save_every=recipe.save_every,
                           seed=recipe.seed, precision=resolve(recipe.precision), stop_after=stop_after)  # fmt: skip
    lora = LoraSettings(recipe.lora_rank, recipe.lora_alpha, 0.05)
    for name, (method, params) in methods(recipe.budget_images).items():
        output = out / name
        if not force and up_to_date(output, recipe):
            console.print(f"{name}: {output} is up to date, kept")
            continue
        if deadline is not None and time.perf_counter() >= deadline:
            console.print(f"{name}: not started, --minutes spent; rerun to go on")
            return False
        checkpoints = cache / f"checkpoint-{name}"
        resume = (checkpoints / "state.pt").is_file()
        console.print(f"{name} {params or ''}: {recipe.steps} steps" + (" (resuming)" if resume else ""))
        start = time.perf_counter()
        job = FinetuneJob(LLAVA_DIR, method, data_dir / DATA_FILE, data_dir / "images", output, options, lora,
                          params, resume=resume, force=True, checkpoints=checkpoints)  # fmt: skip
        try:
            history = fine_tune(job, console, stop_at_checkpoint_after(deadline, options))
        except OutOfTime as stop:
            console.print(f"{name}: {stop} of {recipe.steps}, --minutes spent; rerun to go on")
            return False
        if len(history) < recipe.steps:
            console.print(f"{name}: stopped after --stop-after steps; rerun to go on")
            return False
        make_portable(output)
        console.print(f"{name}: {(time.perf_counter() - start) / 60:.1f} min")
    return True


def main() -> None:
    """Command-line entry of the fine-tuning stage."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="retrain bundles that exist")
    args = parser.parse_args()
    quiet_transformers()
    torch.set_num_threads(2)
    build_finetuned(FinetuneRecipe(), Console(), args.force)


if __name__ == "__main__":
    main()
