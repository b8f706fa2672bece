"""`make zoo`: train the embedded models in stages (CLIP, then LLaVA, then the LLaVA fine-tuned with each reducer
active), deterministically. Each stage checkpoints to a cache outside the repository (`stage.CACHE_DIR`) and
resumes from it when rerun, writes its final weights into `prumerge_cli/zoo/` as soon as it ends (so each stage
can be committed on its own), and records its recipe, machine and minutes in `build.json`, from which the model
card is written. A stage whose weights match its recipe and inputs is kept.
Usage: python -m prumerge_cli.zoo.build [--stages clip,llava,finetuned] [--force] [--quick]"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import CLIPModel

from .. import atomic
from ..cli import quiet_transformers
from ..training.checkpoints import file_digest
from ..versions import cpu_name
from . import ZOO_DIR
from .card import model_card
from .clip_training import clip_run, image_processor, retrieval_top1
from .llava_training import build_llava, llava_run
from .precision import PRECISIONS, native_bf16, resolve
from .processor import save_processor
from .scores import score_llava
from .stage import CACHE_DIR, TrainingRun, checkpoint_step, run_resumable
from .tokenizer import build_tokenizer
from .world import fingerprint

STAGES = ("clip", "llava", "finetuned")
BUILD_FILE = "build.json"
WEIGHTS = "model.safetensors"
SECONDS_PER_STEP = {("clip", True): 0.82, ("clip", False): 3.3, ("llava", True): 0.67, ("llava", False): 3.25}
"""Measured on 2 cores: native bf16 (AVX-512 BF16 EPYC) in bf16, else fp32 on an AVX2 EPYC; a build's own
measurements in `build.json` take over on a machine of the same kind."""
FINETUNE_MINUTES = {True: 165.0, False: 350.0}
"""The six fine-tuned bundles at 2400 steps. Native bf16 (AVX-512 BF16 EPYC, bf16 autocast), measured: prumerge
23.0, random 25.5, pool 20.4, prumerge+ 36.1 minutes (the first two slowed by work beside them), random-plus and
pool-plus taken as 31 and 29 from the same machine's pace. AVX2 in fp32: twice the 175 minutes measured at 1200
steps."""


@dataclass(frozen=True)
class Recipe:
    """Steps, batch sizes, seed, threads and precision (`precision.PRECISIONS`) of a zoo build. The precision is
    the one asked for: `auto` stays `auto`, so that a stage trained in fp32 where bf16 is emulated is not stale on
    a CPU with native bf16; each stage's record says what it ran in."""

    clip_steps: int = 1200
    clip_batch: int = 64
    llava_steps: int = 4000
    llava_images: int = 16
    llava_lr: float = 1.5e-3
    llava_subset_share: float = 0.25
    llava_subset_bias: float = 4.0
    focus_steps: int = 250
    focus_lr: float = 5e-4
    focus_share: float = 0.5
    focus_lean: float = 4.0
    focus_bias: float = 8.0
    seed: int = 0
    threads: int = 2
    precision: str = "auto"
    retrieval_images: int = 256
    vqa_images: int = 300

    def clip(self) -> dict[str, Any]:
        """What the CLIP stage's weights depend on."""
        return {"steps": self.clip_steps, "batch": self.clip_batch, "seed": self.seed, "precision": self.precision}

    def llava(self) -> dict[str, Any]:
        """What the LLaVA stage's weights depend on (beside the CLIP's)."""
        return {"steps": self.llava_steps, "images": self.llava_images, "lr": self.llava_lr, "seed": self.seed,
                "precision": self.precision, "subset_share": self.llava_subset_share,
                "subset_bias": self.llava_subset_bias}  # fmt: skip

    def focus(self) -> dict[str, Any]:
        """What the LLaVA stage's second phase adds: more steps, half of the images tilted up to object-only."""
        return {"steps": self.focus_steps, "lr": self.focus_lr, "subset_share": self.focus_share,
                "subset_lean": self.focus_lean, "subset_bias": self.focus_bias}  # fmt: skip


def progress_bar(console: Console) -> Progress:
    """A bar with the current loss."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )  # fmt: skip


def step_logger(bar: Progress, task: TaskID, console: Console, name: str, total: int) -> Callable[[int, float], None]:
    """Advance the bar; where the console is not a terminal (a CI log), also print a line every 5% of the steps."""
    start = time.perf_counter()
    every = max(1, total // 20)

    def log(step: int, loss: float) -> None:
        bar.update(task, completed=step + 1, loss=loss)
        if not console.is_terminal and ((step + 1) % every == 0 or step == 0):
            minutes = (time.perf_counter() - start) / 60
            console.print(f"{name} step {step + 1}/{total} loss {loss:.3f} ({minutes:.1f} min)")

    return log


class Build:
    """The stages of one build: where they write, where they checkpoint, what they recorded."""

    def __init__(self, recipe: Recipe, out: Path, cache: Path, console: Console):
        self.recipe, self.out, self.cache, self.console = recipe, out, cache, console
        self.records: dict[str, dict[str, Any]] = read_records(out)
        self.tokenizer = build_tokenizer()

    def weights(self, stage: str) -> str | None:
        """sha256 of a stage's saved weights, None if absent."""
        path = self.out / stage / WEIGHTS
        return file_digest(path) if path.is_file() else None

    def inputs(self, stage: str) -> dict[str, Any]:
        """The recipe, the upstream weights and the world a stage's output depends on."""
        if stage == "clip":
            return {"recipe": self.recipe.clip(), "world": fingerprint(lessons=False)}
        return {"recipe": self.recipe.llava(), "focus": self.recipe.focus(), "clip": self.weights("clip"),
                "world": fingerprint(lessons=True)}  # fmt: skip

    def up_to_date(self, stage: str) -> bool:
        """Whether the saved weights are those the recorded run wrote, for the current recipe and inputs."""
        record = self.records.get(stage)
        if record is None or self.weights(stage) != record.get("weights"):
            return False
        return all(record.get(k) == v for k, v in self.inputs(stage).items())

    def expected_minutes(self, stage: str, fresh: bool = False) -> float:
        """Training minutes of a stage on this machine (`fresh`: ignoring its checkpoints): the steps its
        checkpoints have not done yet, at this kind of machine's last measured pace, else the table's."""
        native = native_bf16()
        steps = sum(total - (0 if fresh else checkpoint_step(self.cache / name, settings))
                    for name, settings, total in self.phase_plan(stage))  # fmt: skip
        record = self.records.get(stage, {})
        pace = record.get("seconds_per_step") if record.get("native_bf16") == native else None
        return steps * (pace or SECONDS_PER_STEP[(stage, native)]) / 60

    def plan(self, stages: list[str]) -> list[str]:
        """The stages that will train (not up to date), in order; prints what it will do and for how long."""
        todo, total = [], 0.0
        for stage in stages:
            if stage == "finetuned":
                minutes = FINETUNE_MINUTES[native_bf16()]
                self.console.print(f"- finetuned: LoRA fine-tuning per reducer; bundles of the current LLaVA and "
                                   f"recipe are kept (at most ~{minutes:.0f} min)")  # fmt: skip
                todo.append(stage)
                total += minutes
            elif self.up_to_date(stage) and not (stage == "llava" and "clip" in todo):
                self.console.print(f"- {stage}: up to date ({self.out / stage}), kept")
            else:
                minutes = self.expected_minutes(stage, fresh="clip" in todo)
                self.console.print(f"- {stage}: train, ~{minutes:.0f} min")
                todo.append(stage)
                total += minutes
        self.console.print(f"expected: about {total:.0f} min on this CPU ({cpu_name()}, native bf16: "
                           f"{'yes' if native_bf16() else 'no'}, precision {resolve(self.recipe.precision)}); "
                           f"checkpoints in {self.cache}")  # fmt: skip
        return todo

    def phase_plan(self, stage: str) -> list[tuple[str, dict[str, Any], int]]:
        """A stage's training runs in order: checkpoint name, the settings its checkpoint is for, steps. CLIP;
        LLaVA, then its focus phase (which continues the same model)."""
        r, inputs = self.recipe, self.inputs(stage)
        if stage == "clip":
            return [("clip", inputs, r.clip_steps)]
        first = {k: v for k, v in inputs.items() if k != "focus"}
        return [("llava", first, r.llava_steps), ("llava-focus", inputs, r.focus_steps)]

    def phases(self, stage: str) -> list[tuple[str, dict[str, Any], Callable[[], TrainingRun]]]:
        """`phase_plan` with, for each run, what makes it."""
        r, plan = self.recipe, self.phase_plan(stage)
        if stage == "clip":
            makers = [lambda: clip_run(self.tokenizer, r.clip_steps, r.clip_batch, r.seed, r.precision)]
        else:
            clip = CLIPModel.from_pretrained(str(self.out / "clip"), dtype=torch.float32).eval()
            llava = build_llava(clip, self.tokenizer, r.seed)
            makers = [
                lambda: llava_run(llava, self.tokenizer, r.llava_steps, r.llava_images, r.seed, r.llava_lr,
                                  r.precision, r.llava_subset_share, r.llava_subset_bias),
                lambda: llava_run(llava, self.tokenizer, r.focus_steps, r.llava_images, r.seed, r.focus_lr,
                                  r.precision, r.focus_share, r.focus_bias, r.focus_lean, first=r.llava_steps),
            ]  # fmt: skip
        return [(name, settings, make) for (name, settings, _), make in zip(plan, makers, strict=True)]

    def train(self, stage: str, stop_after: int | None, deadline: float | None = None) -> bool:
        """Train (or resume) a stage's phases and save it; False if it stopped early (see `run_resumable`)."""
        torch.set_num_threads(self.recipe.threads)
        torch.use_deterministic_algorithms(True)
        minutes: dict[str, float] = {}
        steps = 0
        for name, settings, make_run in self.phases(stage):
            run = make_run()
            if not run.steps:
                continue
            with progress_bar(self.console) as bar:
                task = bar.add_task(name, total=run.steps, loss=float("nan"))
                log = step_logger(bar, task, self.console, name, run.steps)
                progress = run_resumable(run, self.cache / name, settings, self.console, log, stop_after,
                                         deadline=deadline)  # fmt: skip
                if progress.finished:  # also where the checkpoint had every step and none ran here
                    bar.update(task, completed=run.steps)
            if not progress.finished:
                self.console.print(f"{name}: stopped; rerun to resume from {self.cache / name}")
                return False
            minutes[name] = round(progress.minutes, 2)
            steps += run.steps
        save_model(run.model, self.tokenizer, self.out / stage)
        if stage == "llava" and (self.out / "finetuned").is_dir():
            from .finetuned import drop_stale

            drop_stale(self.out / "finetuned", self.console)
        total = sum(minutes.values())
        record = {**self.inputs(stage), "weights": self.weights(stage), "minutes": round(total, 2),
                  "phase_minutes": minutes, "seconds_per_step": round(60 * total / steps, 3), "cpu": cpu_name(),
                  "native_bf16": native_bf16(), "precision": resolve(self.recipe.precision),
                  "threads": self.recipe.threads}  # fmt: skip
        record.update(self.evaluate(stage, run.model))
        self.records[stage] = record
        self.write_records()
        self.console.print(f"{stage}: {total:.1f} min of training, saved to {self.out / stage}")
        return True

    def evaluate(self, stage: str, model: torch.nn.Module) -> dict[str, Any]:
        """The scores the card reports: CLIP retrieval; LLaVA accuracy per type and oracle vs random."""
        if stage == "clip":
            top1 = retrieval_top1(model, self.tokenizer, "test", self.recipe.retrieval_images)
            self.console.print(f"clip: held-out image->caption top-1 {top1:.3f}")
            return {"retrieval_top1": top1, "retrieval_images": self.recipe.retrieval_images}
        scores = score_llava(self.out / "llava", self.recipe.vqa_images)
        self.console.print(f"llava: held-out VQA {scores['vqa']['overall']:.3f}; token choice {scores['token_choice']}")
        return scores

    def write_records(self) -> None:
        """`build.json` and the model card, atomically."""
        atomic.write_text(self.out / BUILD_FILE, json.dumps(self.records, indent=2) + "\n")
        atomic.write_text(self.out / "MODEL_CARD.md", model_card(self.recipe, self.records))


def read_records(out: Path) -> dict[str, dict[str, Any]]:
    """The stage records of `out/build.json` (none if absent)."""
    path = out / BUILD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_model(model: torch.nn.Module, tokenizer, target: Path) -> None:
    """fp16 safetensors plus tokenizer and image processor (a LLaVA's whole processor, `processor.py`), swapped in
    atomically; `model` is left rounded to fp16 and back in fp32, exactly the saved weights."""
    with atomic.atomic_dir(target, force=True) as tmp:
        model.to(torch.float16).save_pretrained(tmp)
        if isinstance(model, CLIPModel):
            tokenizer.save_pretrained(tmp)
            image_processor().save_pretrained(tmp)
        else:  # a LLaVA: the processor AutoProcessor loads, with the chat template
            save_processor(tokenizer, tmp)
        model.to(torch.float32)


def refusal(stages: list[str], native: bool, force: bool, quick: bool) -> str | None:
    """Why a build must not start here, or None: training CLIP or LLaVA without native bf16 takes 4-6x longer."""
    if native or force or quick or not {"clip", "llava"} & set(stages):
        return None
    return ("this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo), so training CLIP and LLaVA "
            "would take 4-6 hours instead of about an hour; build anyway with `make zoo FORCE=1` "
            "(python -m prumerge_cli.zoo.build --force)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, print the plan, and run the stages that are not up to date."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"Comma-separated, of {', '.join(STAGES)}.")
    parser.add_argument("--force", action="store_true", help="Build even without native bf16 (slow).")
    parser.add_argument("--quick", action="store_true", help="A few steps only, into --out (checks the pipeline).")
    parser.add_argument("--out", type=Path, default=ZOO_DIR, help="Where clip/, llava/, build.json and the card go.")
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help="Where checkpoints go.")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="Training precision (see the card).")
    parser.add_argument("--stop-after", type=int, help="Checkpoint and stop a stage after N steps of this run.")
    parser.add_argument("--minutes", type=float, help="Checkpoint and stop once this run has trained for M minutes "
                        "(rerun to resume): for a build that spans sessions.")  # fmt: skip
    args = parser.parse_args(argv)
    deadline = None if args.minutes is None else time.perf_counter() + 60 * args.minutes
    quiet_transformers()
    console = Console()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        print(f"error: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    why = refusal(stages, native_bf16(), args.force, args.quick)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    recipe = Recipe(precision=args.precision)
    if args.quick:
        recipe = replace(recipe, clip_steps=4, clip_batch=8, llava_steps=4, focus_steps=2, llava_images=2,
                         retrieval_images=16, vqa_images=10)  # fmt: skip
    build = Build(recipe, args.out, args.cache, console)
    console.print(f"make zoo: stages {', '.join(stages)}; recipe {asdict(recipe)}")
    for stage in build.plan(stages):
        if stage == "finetuned":
            from .finetuned import FinetuneRecipe, build_finetuned

            if args.out.resolve() != ZOO_DIR.resolve():
                console.print("finetuned: skipped (it fine-tunes the LLaVA in prumerge_cli/zoo/)")
                continue
            build_finetuned(FinetuneRecipe(), console, stop_after=args.stop_after, deadline=deadline)
        elif not build.train(stage, args.stop_after, deadline):
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
