"""`prumerge demo`: every method on the embedded LLaVA, compressed, exported to ONNX, scored by held-out
accuracy and timed against the unreduced baseline in one interleaved run."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from . import atomic
from .bench.timing import Latency, interleaved
from .devices import finished, module_device
from .encoder import ReducedVisionEncoder
from .errors import PrumergeError
from .exporters.onnx_export import OnnxOptions, export_onnx
from .lm.llava_lm import LlavaLm
from .lm.positions import DEFAULT_POSITIONS
from .lm.splice import splice
from .progress import Phases
from .runtime.ort import OrtEncoder
from .tables import FoldingTable
from .zoo.oracle import OracleTokens
from .zoo.vqa import VqaScore, vqa_accuracy
from .zoo.world import samples_of


@dataclass
class Variant:
    """One method on the embedded model, with its bundle, export and scores."""

    method: str
    params: dict[str, Any]
    encoder: ReducedVisionEncoder
    ort: OrtEncoder
    score: VqaScore


def fixed_budget_params(prumerge_tokens: float) -> dict[str, dict[str, Any]]:
    """Baselines at PruMerge's mean budget (its kept patches, without the extra token)."""
    budget = max(1, round(prumerge_tokens - 1))
    return {
        "prumerge+": {},
        "topk": {"budget": budget},
        "random": {"budget": budget},
        "pool": {"side": max(1, round(math.sqrt(budget)))},
    }


def run_demo(
    model: Path, out: Path, images: int, timing_batch: int, iters: int, phases: Phases,
    device: torch.device = torch.device("cpu"), dtype: str = "fp32", positions: str = DEFAULT_POSITIONS,
) -> list[dict[str, Any]]:  # fmt: skip
    """Build every variant of `model` under `out` (exported on the CPU, scored and timed with the torch encoders and
    the LLM on `device`, the towers in `dtype`, the tokens at `positions`), then time them together; returns the
    table's rows."""
    if not (model / "config.json").is_file():
        raise PrumergeError(f"no model at {model}; the embedded one is trained by `make zoo`")
    lm = LlavaLm.from_pretrained(model)
    lm.model.to(device)
    variants: list[Variant] = []
    with atomic.atomic_dir(out, force=True) as tmp:

        def add(method: str, params: dict[str, Any]) -> Variant:
            with phases.phase(f"{method}: compress, export --onnx, score {images} images", images) as advance:
                encoder = ReducedVisionEncoder.from_pretrained(model, method, dtype=dtype, positions=positions,
                                                               **params)  # fmt: skip
                encoder.save(tmp / "bundles" / method)
                export_onnx(encoder, tmp / "onnx" / method, OnnxOptions(with_projector=True, max_batch=timing_batch))
                encoder.to(device)
                score = vqa_accuracy(encoder, lm, images=images, progress=advance)
            variant = Variant(method, params, encoder, None, score)  # type: ignore[arg-type]
            variants.append(variant)
            return variant

        add("none", {})
        prumerge = add("prumerge", {})
        for method, params in fixed_budget_params(prumerge.score.tokens_mean).items():
            add(method, params)
    for v in variants:
        v.ort = OrtEncoder(out / "onnx" / v.method, threads=torch.get_num_threads())
    phases.console.print(f"bundles in {out}/bundles, ONNX exports in {out}/onnx", highlight=False)
    warmup = 2
    with phases.phase(
        f"timing {len(variants)} methods x 3 (torch, ORT, prefill), {iters} rounds", warmup + iters
    ) as advance:
        times = time_variants(variants, lm, timing_batch, iters, warmup, advance)
    return table_rows(variants, times)


def time_variants(variants: list[Variant], lm: LlavaLm, batch: int, iters: int, warmup: int = 2,
                  on_round: Callable[[], None] | None = None) -> dict[str, Latency]:  # fmt: skip
    """Encoder latency on torch and ONNX Runtime (the batch at once) and LLM prefill latency (its images one at a
    time, unpadded: padding a batch to its longest image would charge a variable-length reducer for its largest
    image), all interleaved."""
    samples = samples_of("test", 0, batch)
    pixels = variants[0].encoder.processor(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]
    question = lm.encode([samples[0].qas[0].question])[0]
    fns = {}
    for v in variants:
        reduced = v.encoder(pixels, project=True)
        prefills = [splice(lm.embed, lm.bos_id, reduced.row(i), [question]) for i in range(batch)]
        device = module_device(v.encoder)
        fns[f"{v.method}/torch"] = lambda v=v, d=device: finished(v.encoder(pixels, project=True), d)
        fns[f"{v.method}/ort"] = lambda v=v: v.ort(pixels)
        fns[f"{v.method}/prefill"] = lambda bs=prefills, d=device: finished([lm.next_token_logits(b) for b in bs], d)
    with torch.no_grad():
        return interleaved(fns, iters=iters, warmup=warmup, on_round=on_round)


def table_rows(variants: list[Variant], times: dict[str, Latency]) -> list[dict[str, Any]]:
    """One row per method, with ratios to the unreduced baseline."""
    base = variants[0]
    rows = []
    for v in variants:
        row = {"method": v.method, "params": v.params, "regime": "training-free", "positions": v.encoder.positions,
               "tokens": v.score.tokens_mean, **accuracy_fields(v.score)}  # fmt: skip
        for kind in ("torch", "ort", "prefill"):
            row[f"{kind}_ms"] = 1000 * times[f"{v.method}/{kind}"].p50
            row[f"{kind}_ratio"] = times[f"{v.method}/{kind}"].p50 / times[f"{base.method}/{kind}"].p50
        row["tokens_ratio"] = v.score.tokens_mean / base.score.tokens_mean
        rows.append(row)
    return rows


def oracle_row(rows: list[dict[str, Any]], model: Path, images: int, device: torch.device, phases: Phases,
               positions: str = DEFAULT_POSITIONS) -> dict[str, Any]:  # fmt: skip
    """The oracle (`zoo.oracle`: the patches covering the objects) at the random subset's budget."""
    budget = next(r["params"]["budget"] for r in rows if r["method"] == "random")
    encoder = ReducedVisionEncoder.from_pretrained(model, "none", positions=positions).to(device)
    lm = LlavaLm.from_pretrained(model)
    lm.model.to(device)
    with phases.phase(f"oracle at budget {budget}: score {images} images", images) as advance:
        score = vqa_accuracy(OracleTokens(encoder, budget), lm, images=images, progress=advance)
    return {"method": "oracle", "params": {"budget": budget}, "regime": "training-free", "positions": positions,
            "tokens": score.tokens_mean, **accuracy_fields(score)}  # fmt: skip


def accuracy_fields(score: VqaScore) -> dict[str, Any]:
    """A row's accuracy, its 95% interval's half-width (images as the unit), the images and the accuracy by type."""
    return {"accuracy": score.accuracy["overall"], "accuracy_ci95": score.ci95,
            "images": len(score.per_image_accuracy), "per_type": score.accuracy}  # fmt: skip


def percent(row: dict[str, Any]) -> str:
    """A row's accuracy with its interval, e.g. `89.2 ±2.1`."""
    return f"{100 * row['accuracy']:.1f} ±{100 * row['accuracy_ci95']:.1f}"


def row_label(row: dict[str, Any]) -> str:
    """A row's method and parameters as the tables print them, e.g. `random budget=34`."""
    return row["method"] + "".join(f" {k}={v}" for k, v in row["params"].items())


def print_per_type(rows: list[dict[str, Any]], console: Console) -> None:
    """Accuracy per question type, one row per method (the oracle last)."""
    kinds = list(rows[0]["per_type"])
    table = FoldingTable("Training-free accuracy % by question type (no reducer active in the LLM's training)",
                          ["method", "visual tokens", *kinds])  # fmt: skip
    for r in rows:
        table.add_row(row_label(r), f"{r['tokens']:.1f}", *(f"{100 * r['per_type'][k]:.1f}" for k in kinds))
    table.print(console)
    console.print(f"Regime: training-free; reduced tokens at {rows[0]['positions']} positions. The oracle keeps the "
                  "patches covering the objects (it reads the scene): what a perfect selection at random's budget "
                  "would score.", highlight=False)  # fmt: skip


def finetuned_rows(
    finetuned_dir: Path, model: Path, images: int, device: torch.device, phases: Phases, split: str = "test"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Held-out accuracy on `split` of each fine-tuned bundle of `model` in `finetuned_dir` (LoRA LM, trained
    projector), by visual tokens so that methods at one budget sit together, and why each bundle that does not load
    was skipped (weights changed since it was trained)."""
    from .bundle import is_bundle, load, read_bundle
    from .finetune.bundle import load_finetuned_lm
    from .model_ref import resolve_model

    rows, skipped = [], []
    bundles = sorted(p for p in finetuned_dir.iterdir() if is_bundle(p)) if finetuned_dir.is_dir() else []
    for bundle in bundles:
        record = read_bundle(bundle)
        try:
            if resolve_model(record["model"], bundle).resolve() != model.resolve():
                continue
            encoder, lm = load(bundle), load_finetuned_lm(bundle)
        except PrumergeError as exc:
            skipped.append(f"{bundle.name}: {exc}")
            continue
        lm.model.to(device)
        encoder.to(device)
        with phases.phase(f"fine-tuned {bundle.name}: score {images} {split} images", images) as advance:
            score = vqa_accuracy(encoder, lm, split=split, images=images, progress=advance)
        rows.append({"method": record["method"], "params": record["finetune"].get("params", {}),
                     "regime": "fine-tuned", "positions": encoder.positions, "bundle": str(bundle),
                     "steps": record["finetune"].get("steps"),
                     "tokens": score.tokens_mean, **accuracy_fields(score)})  # fmt: skip
    return sorted(rows, key=lambda r: r["tokens"]), skipped


def print_finetuned(rows: list[dict[str, Any]], tuned: list[dict[str, Any]], console: Console) -> None:
    """Fine-tuned bundles beside the same method training-free and the full-token model, per question type; a
    bundle trained for other steps than most is labelled with its steps."""
    if not tuned:
        return
    free = {row_label(r): r for r in rows}
    kinds = [k for k in tuned[0]["per_type"] if k != "overall"]
    table = FoldingTable("Fine-tuned with the reducer active (LoRA on the LM, projector trained) vs training-free",
                          ["method", "visual tokens", "fine-tuned % (95% CI)", "training-free %",
                           "of full-token accuracy", *kinds])  # fmt: skip
    full = rows[0]["accuracy"]
    steps = Counter(r.get("steps") for r in tuned).most_common(1)[0][0]
    for r in tuned:
        label = row_label(r)
        same = free.get(label)  # the same method at the same budget
        shown = label if r.get("steps") == steps else f"{label} ({r.get('steps')} steps)"  # another recipe's bundle
        table.add_row(shown, f"{r['tokens']:.1f}", percent(r),
                      "-" if same is None else f"{100 * same['accuracy']:.1f}", f"{100 * r['accuracy'] / full:.1f}%",
                      *(f"{100 * r['per_type'][k]:.0f}" for k in kinds))  # fmt: skip
    table.print(console)
    placed = ", ".join(sorted({r["positions"] for r in tuned}))
    console.print(f"Fine-tuned rows place the tokens as their bundles were trained ({placed} positions); the "
                  f"training-free column is the demo's ({rows[0]['positions']}).", highlight=False)  # fmt: skip


def print_rows(rows: list[dict[str, Any]], images: int, batch: int, console: Console) -> None:
    """The demo's table."""
    table = FoldingTable(
        f"Embedded LLaVA: {images} test images x 6 questions; latency p50 of {batch} images "
        "(encoders batched, prefill one image at a time)",
        ["method", "visual tokens", "accuracy % (95% CI)", "encoder torch ms", "encoder ORT ms", "LLM prefill ms"],
    )
    for r in rows:
        table.add_row(
            row_label(r), f"{r['tokens']:.1f} (x{r['tokens_ratio']:.2f})", percent(r),
            f"{r['torch_ms']:.1f} (x{r['torch_ratio']:.2f})", f"{r['ort_ms']:.1f} (x{r['ort_ratio']:.2f})",
            f"{r['prefill_ms']:.1f} (x{r['prefill_ratio']:.2f})",
        )  # fmt: skip
    table.print(console)
    console.print(
        "(x...) = ratio to the unreduced baseline measured in the same run; accuracy: the greedy reply ends with "
        "the answer (training-free: no reducer was active in the LLM's training); ± the 95% confidence interval "
        "with images as the unit. Recipes and budgets were chosen on the val split; these are test-split figures."
    )
