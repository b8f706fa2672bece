"""The model card of the embedded models, written from the stage records of `build.json` (recipe, machine,
minutes and scores of each stage)."""

from __future__ import annotations

from typing import Any

from ..versions import package_versions
from .clip_training import REGION_WEIGHT
from .world import QUESTION_TYPES, vocabulary

PENDING = "not built by this recipe yet; the weights there now come from an earlier recipe (run `make zoo`)"


def stage_line(record: dict[str, Any] | None, recipe: dict[str, Any], focus: dict[str, Any] | None = None) -> str:
    """'23.7 min of training (...) on <cpu> (native bf16: yes, trained in bf16, 2 threads)' or the pending note;
    where the recorded run used other settings than `recipe` (the stage's part of the current recipe) or `focus`
    (its second phase), which."""
    if record is None:
        return PENDING
    bf16 = "yes" if record["native_bf16"] else "no"
    phases = record.get("phase_minutes", {})
    split = f": {' + '.join(f'{m:.1f} ({name})' for name, m in phases.items())}" if len(phases) > 1 else ""
    line = (f"{record['minutes']:.1f} min of training{split} ({record['seconds_per_step']:.2f} s per step) on "
            f"{record['cpu']} (native bf16: {bf16}, trained in {record['precision']}, "
            f"{record['threads']} threads)")  # fmt: skip
    changed = []
    for part, prefix, wanted in (("recipe", "", recipe), ("focus", "focus ", focus or {})):
        ran = record.get(part, wanted)
        changed += [f"{prefix}{key} {ran.get(key)} (recipe: {value})" for key, value in wanted.items()
                    if ran.get(key) != value]  # fmt: skip
    if changed:
        line += f". **The weights here come from a run with {', '.join(changed)}**; `make zoo` retrains them"
    return line


def accuracy_rows(record: dict[str, Any] | None) -> str:
    """The per-type table rows."""
    if record is None:
        return f"| (all) | {PENDING} |"
    return "\n".join(f"| {kind} | {100 * record['vqa'][kind]:.1f} |" for kind in (*QUESTION_TYPES, "overall"))


def token_choice(record: dict[str, Any] | None) -> str:
    """The oracle-vs-random pair and the positions table."""
    if record is None:
        return PENDING
    pair = record["token_choice"]
    lines = [f"At {pair['budget']} of {pair['of']} tokens (training-free, original positions): the oracle that keeps "
             f"the patches covering the objects (a part of each object, the objects in turn) scores "
             f"**{100 * pair['oracle']:.1f}%**, a random subset of the same size **{100 * pair['random']:.1f}%** "
             f"({100 * (pair['oracle'] - pair['random']):+.1f} points).", ""]  # fmt: skip
    per_type = pair.get("per_type", {})
    if per_type:
        lines += [f"| {pair['budget']} tokens | {' | '.join(QUESTION_TYPES)} | overall |",
                  f"|---|{'---|' * (len(QUESTION_TYPES) + 1)}"]  # fmt: skip
        for name, by in per_type.items():
            lines.append(f"| {name} | {' | '.join(f'{100 * by[k]:.1f}' for k in (*QUESTION_TYPES, 'overall'))} |")
        lines.append("")
    lines += ["| method | contiguous positions % | original positions % |", "|---|---|---|"]
    for method, by in record["positions"].items():
        lines.append(f"| {method} | {100 * by['contiguous']:.1f} | {100 * by['original']:.1f} |")
    return "\n".join(lines)


def finetuned_section() -> str:
    """The recipe of the fine-tuned bundles and how it was chosen."""
    from .finetuned import FinetuneRecipe

    f = FinetuneRecipe()
    return (f"- One recipe for every method (PruMerge's regime): LoRA rank {f.lora_rank}, alpha {f.lora_alpha:g} on "
            f"every linear layer of the LM, the projector trained (lr {f.projector_lr:g}); {f.steps} steps of "
            f"{f.batch_size} conversations (lr {f.lr:g}) drawn from {f.conversations} training conversations, seed "
            f"{f.seed}; bf16 autocast where the CPU has native bf16.\n"
            f"- Bundles: `prumerge`, `prumerge+`, and `random` and `pool` at each one's mean token count over the "
            f"first {f.budget_images} val images (`random-plus` and `pool-plus` at PruMerge+'s).\n"
            f"- Splits: recipes and budgets are chosen on the val split (`python -m prumerge_cli.zoo.compare "
            f"prumerge_cli/zoo/finetuned --split val`); the figures the README and the demo report are the test "
            f"split's, each with a 95% interval that takes images as the unit.")  # fmt: skip


def model_card(recipe: Any, records: dict[str, dict[str, Any]]) -> str:
    """The card for `recipe` (a `build.Recipe`) and the stages recorded so far."""
    clip, llava = records.get("clip"), records.get("llava")
    return CARD.format(
        r=recipe,
        subset_pct=100 * recipe.llava_subset_share,
        focus_pct=100 * recipe.focus_share,
        focus_lo=recipe.focus_lean - recipe.focus_bias,
        focus_hi=recipe.focus_lean + recipe.focus_bias,
        vocab=len(vocabulary()),
        region_weight=REGION_WEIGHT,
        clip_stage=stage_line(clip, recipe.clip()),
        llava_stage=stage_line(llava, recipe.llava(), recipe.focus()),
        retrieval=PENDING if clip is None else f"**{100 * clip['retrieval_top1']:.1f}%**",
        questions="" if llava is None else f"{llava['questions']} test questions, ",
        rows=accuracy_rows(llava),
        token_choice=token_choice(llava),
        finetuned=finetuned_section(),
        versions=", ".join(f"{k} {v}" for k, v in package_versions().items()),
    )


CARD = """# The embedded default models

Two real Hugging Face checkpoints trained in this repository by `make zoo` (`python -m prumerge_cli.zoo.build`)
on the procedural visual-QA world of `prumerge_cli/zoo/world.py`. They exist so that the demo and the tests
run the whole pipeline on a model whose attention means something, and so that every reducer can be scored
by accuracy. Saved in fp16 safetensors.

## The world
224x224 images: 2-4 objects (6 colours, 4 shapes, 2 sizes: radius 13-16 or 22-28 pixels) in distinct cells of
a 3x3 layout, jittered inside their cell, over grey clutter (noise, lines and specks). A cell is named by one
word (northwest, north, ..., center, ..., southeast). A caption lists every object with its size, colour, shape
and position. Six question types need spatial detail: the colour, the shape and the size of the object at a
position, the number of objects, the colour of what is left of / right of / above / below the object at a
position, and whether a named object is at a position (POPE-like yes/no, balanced; a no is a near miss at an
object's cell, other colour or other shape, or an empty cell). Questions end with their last word, no "?", and
the reply follows it: "what color is the object at northwest" -> "red". Relation and presence are answered in two
steps, the lookup first: "what color is left of the object at center" -> "west blue" (or "west nothing"), "is there
a red circle at northwest" -> "blue circle no"; a reply is right if it ends with the answer. Asked directly
(by an object's looks, or as a yes/no that compares two things) they stayed at chance in every earlier build
and probe (issue #19). Splits are disjoint seed ranges (train from 0, val from 10,000,000, test from
20,000,000). The word-level vocabulary has {vocab} words; its tokenizer reads "an" as "a" ("is there an
orange cross" is the trained "is there a orange cross").

## `clip/` - CLIPModel
- Vision: ViT, 224x224 pixels, 14-pixel patches (16x16 = 256 patches + CLS), 4 layers, width 128, 4 heads;
  the layout of the reduction is LLaVA-1.5's (CLS, patches, feature layer -2, score layer = the last).
- Text: word-level tokenizer, 2 layers, width 128.
- Training: symmetric InfoNCE, {r.clip_steps} steps of {r.clip_batch} fresh image-caption pairs, each image also
  contrasted with the batch's near-miss captions (one attribute of one object changed), plus {region_weight} x a
  region loss (each object's 3x3 cell, mean-pooled at the feature layer LLaVA reads, classified against the text
  embeddings of all 48 phrases "size colour shape"). Patch position embeddings start as a 2-D sine-cosine grid.
  AdamW (lr 2e-3, weight decay 0.05), 5% warm-up then cosine decay, seed {r.seed}.
- Stage: {clip_stage}.
- Held-out image->caption retrieval top-1 among {r.retrieval_images} test captions: {retrieval}.

## `llava/` - LlavaForConditionalGeneration
- Vision tower: the CLIP above, frozen; `vision_feature_layer=-2`, strategy `default` (CLS dropped).
- Projector: 2-layer MLP with GELU (128 -> 256 -> 256). LM: Llama, 4 layers, width 256, 4 heads.
- Training (all 256 visual tokens): per image its training conversation (`world.lesson`, loss on answers and
  `</s>`), {r.llava_steps} steps of {r.llava_images} fresh images, AdamW (lr {r.llava_lr}), 5% warm-up then cosine
  decay, seed {r.seed}.
- **Reduced inputs in training:** {subset_pct:.0f}% of the training images show the LM only a subset of their
  tokens (8 to 64 of 256, at their patches' original positions), drawn with weights exp(b x the share of the
  patch an object covers), b uniform in [-{r.llava_subset_bias}, {r.llava_subset_bias}] per image: from mostly
  background through uniform to mostly object patches. So the LM learns to answer from whatever tokens it is
  given, and to count and size objects from the tokens it has rather than from their share of the image.
- **Second phase, towards object-only inputs:** {r.focus_steps} more steps of fresh images (AdamW anew, lr
  {r.focus_lr}, 5% warm-up then cosine decay), {focus_pct:.0f}% of them reduced as above with b uniform in
  [{focus_lo:g}, {focus_hi:g}]: from b of about 8 on, a subset holds only object patches as long as the objects
  have enough of them. After the first phase alone the LM had never seen an input without background, and an
  oracle keeping the objects' patches did no better than a random subset (61.0% against 64.9% at 26 tokens): its
  count and "nothing" answers leant on background tokens. **A stock LLaVA never sees reduced inputs in training,
  so the training-free figures of every method, the oracle's most of all, are kinder here than they would be on
  it.**
- Stage: {llava_stage}.

## Held-out VQA accuracy, all visual tokens ({questions}greedy replies)

| question type | accuracy % |
|---|---|
{rows}

## Does the choice of tokens matter?
{token_choice}

## `finetuned/` - the LLaVA fine-tuned with each reducer active
{finetuned}

## Reproducing
`make zoo` runs the stages CLIP, LLaVA and the fine-tuned bundles with {r.threads} threads and deterministic
algorithms. It prints what it will do and the expected time first; each stage checkpoints at least every 5
minutes to `~/.cache/prumerge/zoo` (`PRUMERGE_CACHE` moves it) and resumes from there when rerun, and writes its
weights and its record (`build.json`) here as soon as it ends. Precision `auto` trains in bf16 where the CPU
multiplies bf16 natively (AVX-512 BF16 or AMX) and in fp32 elsewhere; without native bf16 the build refuses unless
forced (`make zoo FORCE=1`), as it would take 4-6 times as long. Versions: {versions}.
"""
