"""`make zoo`: train the embedded CLIP and LLaVA from scratch, deterministically, save them in fp16 and
write the model card. Usage: python -m prumerge_cli.zoo.build [--quick]"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import CLIPModel

from .. import atomic
from ..cli import quiet_transformers
from ..encoder import ReducedVisionEncoder
from ..lm.llava_lm import LlavaLm
from ..versions import cpu_name, package_versions
from . import CLIP_DIR, LLAVA_DIR, MODEL_CARD
from .clip_training import REGION_WEIGHT, image_processor, retrieval_top1, train_clip
from .llava_training import build_llava, train_llava
from .precision import PRECISIONS, native_bf16, resolve
from .tokenizer import build_tokenizer
from .vqa import VqaScore, vqa_accuracy
from .world import QUESTION_TYPES, vocabulary


@dataclass(frozen=True)
class Recipe:
    """Steps, batch sizes, seed, threads and precision (`precision.PRECISIONS`) of a zoo build."""

    clip_steps: int = 1200
    clip_batch: int = 64
    llava_steps: int = 4000
    llava_images: int = 16
    llava_lr: float = 1.5e-3
    seed: int = 0
    threads: int = 2
    precision: str = "auto"
    retrieval_images: int = 256
    vqa_images: int = 300


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


def save_model(model, tokenizer, target: Path) -> None:
    """fp16 safetensors plus tokenizer and image processor, swapped in atomically."""
    with atomic.atomic_dir(target, force=True) as tmp:
        model.to(torch.float16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor().save_pretrained(tmp)
        model.to(torch.float32)


def build(recipe: Recipe, out: Path, console: Console, clip_from: tuple[Path, float] | None = None) -> None:
    """Train, save to `out/clip` and `out/llava`, evaluate, and write `out/MODEL_CARD.md`.

    `clip_from` = (directory, minutes) reuses a CLIP trained earlier by this recipe (fp32 checkpoint)."""
    clip_dir, llava_dir = out / CLIP_DIR.name, out / LLAVA_DIR.name
    recipe = replace(recipe, precision=resolve(recipe.precision))
    console.print(f"Training precision: {recipe.precision}")
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    if clip_from is not None:
        clip, clip_minutes = CLIPModel.from_pretrained(str(clip_from[0]), dtype=torch.float32).eval(), clip_from[1]
    else:
        with progress_bar(console) as bar:
            task = bar.add_task("CLIP (contrastive)", total=recipe.clip_steps, loss=float("nan"))
            start = time.perf_counter()
            log = step_logger(bar, task, console, "CLIP", recipe.clip_steps)
            clip = train_clip(tokenizer, recipe.clip_steps, recipe.clip_batch, recipe.seed, recipe.precision, log)
            clip_minutes = (time.perf_counter() - start) / 60
    retrieval = retrieval_top1(clip, tokenizer, "test", recipe.retrieval_images)
    console.print(f"CLIP: {clip_minutes:.1f} min, held-out image->caption top-1 {retrieval:.3f}")
    save_model(clip, tokenizer, clip_dir)  # leaves `clip` rounded to fp16, exactly the saved tower

    llava = build_llava(clip, tokenizer, recipe.seed)
    with progress_bar(console) as bar:
        task = bar.add_task("LLaVA (projector + LM)", total=recipe.llava_steps, loss=float("nan"))
        start = time.perf_counter()
        log = step_logger(bar, task, console, "LLaVA", recipe.llava_steps)
        train_llava(
            llava, tokenizer, recipe.llava_steps, recipe.llava_images, recipe.seed, recipe.llava_lr, recipe.precision,
            log,
        )  # fmt: skip
        llava_minutes = (time.perf_counter() - start) / 60
    save_model(llava, tokenizer, llava_dir)

    encoder = ReducedVisionEncoder.from_pretrained(llava_dir, "none")
    score = vqa_accuracy(encoder, LlavaLm.from_pretrained(llava_dir), images=recipe.vqa_images)
    console.print(f"LLaVA: {llava_minutes:.1f} min, held-out VQA {score.accuracy['overall']:.3f}")
    size = sum(f.stat().st_size for d in (clip_dir, llava_dir) for f in d.iterdir()) / 2**20
    card = model_card(recipe, clip_minutes, llava_minutes, retrieval, score, size)
    atomic.write_text(out / MODEL_CARD.name, card)


def model_card(
    recipe: Recipe, clip_minutes: float, llava_minutes: float, retrieval: float, score: VqaScore, size_mib: float
) -> str:
    """The card: what the models are, how they were trained, how well they do."""
    rows = "\n".join(f"| {kind} | {100 * score.accuracy[kind]:.1f} |" for kind in (*QUESTION_TYPES, "overall"))
    return MODEL_CARD_TEMPLATE.format(
        **vars(recipe),
        region_weight=REGION_WEIGHT,
        size=size_mib,
        vocab=len(vocabulary()),
        clip_minutes=clip_minutes,
        llava_minutes=llava_minutes,
        retrieval_pct=100 * retrieval,
        questions=score.questions,
        rows=rows,
        cpu=cpu_name(),
        native_bf16="yes" if native_bf16() else "no",
        versions=", ".join(f"{k} {v}" for k, v in package_versions().items()),
    )


MODEL_CARD_TEMPLATE = """# The embedded default models

Two real Hugging Face checkpoints trained in this repository by `make zoo` (`python -m prumerge_cli.zoo.build`)
on the procedural visual-QA world of `prumerge_cli/zoo/world.py`. They exist so that the demo and the tests
run the whole pipeline on a model whose attention means something, and so that every reducer can be scored
by accuracy. Saved in fp16 safetensors ({size:.1f} MiB in all).

## The world
224x224 images: 2-4 objects (6 colours, 4 shapes, 2 sizes: radius 13-16 or 22-28 pixels) in distinct cells of
a 3x3 layout, jittered inside their cell, over grey clutter (noise, lines and specks). A cell is named by one
word (northwest, north, ..., center, ..., southeast). A caption lists every object with its size, colour, shape
and position. Six question types need spatial detail: the colour, the shape and the size of the object at a
position, the number of objects, whether one named object is left of / right of / above / below another
(yes/no), and whether an object is present (POPE-like yes/no, balanced). Questions end with their last word,
no "?", and the answer follows it: "what color is the object at northwest" -> "red". A from-scratch LM learns
to look a cell up from the word it is reading quickly (3 objects, colour questions only: 97% after 200
steps), but not when the position first has to be carried to a later token ("at top left ?": 42% at 200
steps, chance 33%). Splits are disjoint seed ranges (train from 0, val from 10,000,000, test from 20,000,000).
Each image also has a training conversation (colour, shape and size of every object, the count, three
relations, four presence questions, then "describe the image ." answered by the caption) and a near-miss
caption (one attribute of one object changed).

## `clip/` - CLIPModel
- Vision: ViT, 224x224 pixels, 14-pixel patches (16x16 = 256 patches + CLS), 4 layers, width 128, 4 heads.
  224 rather than LLaVA-1.5's 336: at 577 tokens attention costs about 4x more per layer and both models
  must train within 90 minutes on 2 CPU cores; the layout of the reduction is the same (CLS, patches,
  feature layer -2, score layer = the last).
- Text: word-level tokenizer (a `tokenizers` WordLevel model, {vocab} words), 2 layers, width 128.
- Training: symmetric InfoNCE, {clip_steps} steps of {clip_batch} fresh image-caption pairs, each image also
  contrasted with the batch's {clip_batch} near-miss captions (without them the tower learned colours and
  positions but hardly shapes), plus {region_weight} x a region loss: each object's 3x3 cell, mean-pooled at
  the feature layer LLaVA reads (-2) and passed through the post-layernorm and projection, is classified
  against the text embeddings of all 48 phrases "size colour shape" (without it the caption loss was met
  from [CLS], and a linear probe read an object's shape from its cell's mean patch 32% of the time, chance 25%;
  with it 93%).
  Precision {precision}, AdamW (lr 2e-3, weight decay 0.05), 5% warm-up then cosine decay, seed {seed}:
  {clip_minutes:.1f} min. The patch position embeddings start as a 2-D sine-cosine grid
  (row and column, CLS at zero) and are trained on: from the default random start the patch features kept so
  little absolute position (a linear probe found a patch's 3x3 cell 15% of the time, chance 11%) that the LLaVA
  could not tell which object "the object at northwest" meant.
- Held-out image->caption retrieval top-1 among {retrieval_images} test captions: **{retrieval_pct:.1f}%**.

## `llava/` - LlavaForConditionalGeneration
- Vision tower: the CLIP above, frozen; `vision_feature_layer=-2`, strategy `default` (CLS dropped).
- Projector: 2-layer MLP with GELU (128 -> 256 -> 256).
- LM: Llama, 4 layers, width 256, 4 heads, the same word-level tokenizer.
- Training (LLaVA-1.5 style, all 256 visual tokens): per image its training conversation
  (`<s> <image tokens> q1 a1 </s> q2 a2 </s> ... describe the image . <caption> </s>`, loss on answers and
  `</s>`), {llava_steps} steps of {llava_images} fresh images, precision {precision}, AdamW (lr {llava_lr}), 5%
  warm-up then cosine decay, seed {seed}: {llava_minutes:.1f} min.

## Held-out VQA accuracy, all visual tokens ({questions} test questions, greedy first answer token)

| question type | accuracy % |
|---|---|
{rows}

## Reproducing
`make zoo` retrains both from scratch with {threads} threads and deterministic algorithms; machine: {cpu}
(native bf16: {native_bf16}); {versions}.

Precision `auto` (the default) trains in bf16 autocast where the CPU multiplies bf16 natively (AVX-512 BF16
or AMX) and in fp32 elsewhere, where emulated bf16 is about 8x slower than fp32. The 90-minute budget holds on
the former: a CLIP step took 1.3 s and a LLaVA step 0.8 s in bf16 on a 2-core Sapphire Rapids Xeon (AMX),
against 3.3 s and 4.1-4.6 s in fp32 on a 2-core AVX2 EPYC. `--precision bf16` reproduces the bf16 recipe
anywhere, slowly.
"""


def main() -> None:
    """Parse arguments and build."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="A few steps only (checks the pipeline).")
    parser.add_argument("--out", type=Path, default=CLIP_DIR.parent, help="Where clip/, llava/ and the card go.")
    parser.add_argument("--clip", type=Path, help="Reuse a CLIP trained by this recipe (fp32) instead of training.")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="Training precision (see the card).")
    parser.add_argument("--clip-minutes", type=float, default=float("nan"), help="Its measured training time.")
    args = parser.parse_args()
    quiet_transformers()
    recipe = Recipe(precision=args.precision)
    if args.quick:
        recipe = replace(recipe, clip_steps=4, llava_steps=4, retrieval_images=16, vqa_images=10)
    build(recipe, args.out, Console(), None if args.clip is None else (args.clip, args.clip_minutes))


if __name__ == "__main__":
    main()
