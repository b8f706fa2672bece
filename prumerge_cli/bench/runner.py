"""`prumerge bench`: every variant of one model against its unreduced baseline, in one interleaved run."""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..bundle import is_bundle, read_bundle
from ..devices import finished
from ..dynamic.bundle import is_dynamic
from ..lm.positions import DEFAULT_POSITIONS
from ..model_ref import resolve_model
from ..progress import Phases
from ..reducers import PAD_INDEX, ReducedTokens
from ..versions import cpu_name, package_versions
from . import cost_model
from .dynamic_bench import dynamic_rows
from .llm_timing import PrefillCase, prefill_and_decode, random_llm, synthetic_case
from .memory import peak_memory
from .timing import Latency, interleaved
from .variants import Variant, build_variants

SCHEMA = "prumerge-bench"
SCHEMA_VERSION = 1


@dataclass
class BenchSettings:
    """How to measure."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    backends: list[str] = field(default_factory=lambda: ["torch"])
    methods: list[str] = field(default_factory=lambda: ["prumerge"])
    warmup: int = 2
    iters: int = 10
    threads: int | None = None
    llm: Path | None = None
    llm_shape: str | None = None
    prompts: list[str] = field(default_factory=lambda: ["Describe the image."])
    max_new_tokens: int = 8
    dynamic_tokens: int = 48
    vqa_images: int = 100
    device: str = "cpu"  # where the torch variants and the LLM run
    dtype: str = "fp32"  # the vision tower's (and its exports') dtype
    positions: str = DEFAULT_POSITIONS  # of the methods run on a model directory
    model: Path | None = None  # where the bundles' model is, if not where they record
    full_hash: bool = False  # check the bundles' model weights by their full hash


def run_bench(
    targets: list[Path], pixels: torch.Tensor, image_source: str, settings: BenchSettings, phases: Phases
) -> dict[str, Any]:
    """Measure and return the report (schema `prumerge-bench` v1), each phase shown by `phases`."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dynamic = [t for t in targets if is_bundle(t) and is_dynamic(Path(t))]
    others, methods = [t for t in targets if t not in dynamic], settings.methods
    if not others:  # only predictor bundles: the encoder table shows their model's baseline
        record = read_bundle(dynamic[0])["model"]
        others, methods = [resolve_model(record, Path(dynamic[0]), settings.model)], ["none"]
    rounds = settings.warmup + settings.iters
    with tempfile.TemporaryDirectory(prefix="prumerge-bench-") as workdir:
        with phases.phase("preparing the variants (ONNX exports for ort)") as advance:
            baseline, variants = build_variants(
                others, methods, settings.backends, max(settings.batch_sizes), Path(workdir), settings.threads,
                torch.device(settings.device), settings.dtype, settings.positions, settings.model, settings.full_hash,
                advance,
            )  # fmt: skip
        with torch.no_grad():
            with phases.phase(f"running {len(variants)} variants on {len(pixels)} images", len(variants)) as advance:
                outputs = {}
                for v in variants:
                    outputs[id(v)] = run_all(v, pixels, max(settings.batch_sizes))
                    advance()
            rows = [encoder_row(v, outputs, variants) for v in variants]
            for batch in settings.batch_sizes:
                with phases.phase(f"timing {len(variants)} encoders at batch {batch}, rounds", rounds) as advance:
                    time_encoders(rows, variants, cycle(pixels, batch), batch, settings, advance)
            llm_rows = llm_section(variants, outputs, pixels, settings, phases)
            accuracy = embedded_accuracy(baseline.model_dir, variants, settings, phases)
        dynamic_section = [{"bundle": str(t), "rows": dynamic_rows(Path(t), pixels, settings, phases)}
                           for t in dynamic]  # fmt: skip
    for row in rows:
        row["fidelity"].update(accuracy.get(row["variant"], {}))
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": package_versions("onnx", "onnxruntime", "onnxscript"),
        "settings": {
            "targets": [str(t) for t in targets],
            "model": str(baseline.model_dir),
            "images": image_source,
            "image_count": len(pixels),
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()},
        },
        "encoder": rows,
        "llm": llm_rows,
        "dynamic": dynamic_section,
        "cost_model": {
            "formulas": cost_model.__doc__,
            "text_tokens": cost_model.LLAVA_TEXT_TOKENS,
            "reference_llava_1_5_7b": cost_model.compare_with_published(),
        },
    }


def machine() -> dict[str, Any]:
    """Where the run happened."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "processor": cpu_name(),
            "cpu_count": torch.get_num_threads(), "gpu": gpu}  # fmt: skip


def cycle(pixels: torch.Tensor, batch: int) -> torch.Tensor:
    """`batch` images, repeating the given ones if there are fewer."""
    return pixels[torch.arange(batch) % len(pixels)]


def run_all(variant: Variant, pixels: torch.Tensor, chunk: int) -> ReducedTokens:
    """The variant's output on every image, padded to one width."""
    parts = [variant.run(pixels[i : i + chunk]) for i in range(0, len(pixels), chunk)]
    width = max(p.tokens.shape[1] for p in parts)
    tokens = torch.cat([F.pad(p.tokens, (0, 0, 0, width - p.tokens.shape[1])) for p in parts])
    indices = torch.cat([F.pad(p.indices, (0, width - p.indices.shape[1]), value=PAD_INDEX) for p in parts])
    return ReducedTokens(tokens, torch.cat([p.lengths for p in parts]), indices, span=parts[0].span)


def mean_embedding(out: ReducedTokens) -> torch.Tensor:
    """[B, C] mean of each image's valid tokens."""
    mask = out.mask[..., None].to(torch.float32)
    return (out.tokens.float() * mask).sum(1) / mask.sum(1)


def baseline_of(variant: Variant, variants: list[Variant]) -> Variant:
    """The unreduced baseline on the same backend."""
    return next(v for v in variants if v.baseline and v.backend == variant.backend)


def encoder_row(variant: Variant, outputs: dict[int, ReducedTokens], variants: list[Variant]) -> dict[str, Any]:
    """Tokens kept and embedding fidelity of one variant over all images."""
    out, base = outputs[id(variant)], outputs[id(baseline_of(variant, variants))]
    lengths = out.lengths.float()
    cosine = F.cosine_similarity(mean_embedding(out), mean_embedding(base), dim=-1)
    return {
        "variant": variant.label, "method": variant.method, "params": variant.params, "backend": variant.backend,
        "regime": variant.regime, "positions": variant.positions, "baseline": variant.baseline,
        "tokens": {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max()),
                   "ratio": float(lengths.mean() / base.lengths.float().mean())},
        "fidelity": {"mean_embedding_cosine": float(cosine.mean())},
        "by_batch": {},
    }  # fmt: skip


def time_encoders(rows: list[dict], variants: list[Variant], pixels: torch.Tensor, batch: int, s: BenchSettings,
                  advance: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Interleaved latency, throughput and peak memory of every variant at one batch size (`advance` after each
    round)."""
    fns = {str(i): (lambda v=v: finished(v.run(pixels), v.device)) for i, v in enumerate(variants)}
    times = interleaved(fns, iters=s.iters, warmup=s.warmup, on_round=advance)
    memory = {str(i): peak_memory(fns[str(i)], v.device) for i, v in enumerate(variants)}
    for i, (row, variant) in enumerate(zip(rows, variants, strict=True)):
        base = str(variants.index(baseline_of(variant, variants)))
        lat, base_lat = times[str(i)], times[base]
        row["by_batch"][str(batch)] = {
            "latency_ms": {"p10": 1000 * lat.p10, "p50": 1000 * lat.p50, "p90": 1000 * lat.p90},
            "images_per_s": batch / lat.p50,
            "memory": memory[str(i)],
            "ratios": {"latency": lat.p50 / base_lat.p50, "throughput": base_lat.p50 / lat.p50,
                       "memory": memory_ratio(memory[str(i)], memory[base])},
        }  # fmt: skip


def llm_section(
    variants: list[Variant], outputs: dict[int, ReducedTokens], pixels: torch.Tensor, s: BenchSettings, phases: Phases
) -> list[dict[str, Any]]:
    """Prefill latency, KV bytes and decode-step latency with each variant's visual tokens."""
    if s.llm is None and s.llm_shape is None:
        return []
    torch_variants = [v for v in variants if v.backend == "torch"] or variants
    if s.llm is not None:
        from ..lm.llava_lm import LlavaLm

        lm = LlavaLm.from_pretrained(s.llm, "fp16" if torch.device(s.device).type == "cuda" else "fp32")
        lm.model.to(s.device)
        decoder, shape_name, shape = lm.model.model.language_model, str(s.llm), None
    else:
        lm = None
        shape_name, shape = cost_model.shape_named(s.llm_shape)
        with phases.phase(f"building a random-weight {s.llm_shape} decoder"):
            decoder = random_llm(shape, torch.device(s.device))
    rows = []
    for batch in s.batch_sizes:
        dtype = next(decoder.parameters()).dtype
        cases = {id(v): llm_case(v, outputs, pixels, batch, lm, shape, dtype, s) for v in torch_variants}
        fns, sizes = {}, {}
        for v in torch_variants:
            prefill, decode, sizes[id(v)] = prefill_and_decode(decoder, cases[id(v)])
            fns[f"{id(v)}/prefill"], fns[f"{id(v)}/decode"] = prefill, decode
        name = f"timing the LLM's prefill and decode step with {len(torch_variants)} variants at batch {batch}, rounds"
        with phases.phase(name, s.warmup + s.iters) as advance:
            times = interleaved(fns, iters=s.iters, warmup=s.warmup, on_round=advance)
        base = baseline_of(torch_variants[0], torch_variants)
        for v in torch_variants:
            rows.append(llm_row(v, base, batch, cases, times, sizes, shape_name, shape))
    if lm is not None:
        with phases.phase(f"answer fidelity of {len(torch_variants)} variants"):
            fidelity = answer_fidelity(lm, torch_variants, outputs, s)
        for row in rows:
            row["fidelity"] = fidelity[row["variant"]]
    return rows


def llm_case(variant, outputs, pixels, batch, lm, shape, dtype, s: BenchSettings) -> PrefillCase:
    """The LLM input for `batch` images of a variant: spliced real tokens, or random ones of the same count."""
    out = outputs[id(variant)]
    rows = torch.arange(batch) % len(pixels)
    if lm is not None:
        from ..lm.splice import splice

        reduced = select_rows(out, rows, lm.embed.weight.device)
        b = splice(lm.embed, lm.bos_id, reduced, lm.encode([s.prompts[0]]) * batch)
        return PrefillCase(b.inputs_embeds, b.attention_mask, b.position_ids)
    visual = round(float(out.lengths[rows].float().mean()))
    return synthetic_case(shape.hidden, batch, visual, cost_model.LLAVA_TEXT_TOKENS, dtype, torch.device(s.device))


def llm_row(v, base, batch, cases, times, sizes, shape_name, shape) -> dict[str, Any]:
    """One variant's LLM figures, with ratios to the baseline and, for named shapes, the cost model's ideal."""
    prefill, decode = times[f"{id(v)}/prefill"], times[f"{id(v)}/decode"]
    base_prefill, base_decode = times[f"{id(base)}/prefill"], times[f"{id(base)}/decode"]
    length = int(cases[id(v)].attention_mask.sum(1).float().mean())
    row = {
        "variant": v.label, "llm": shape_name, "batch": batch, "sequence_tokens": length,
        "prefill_ms": _ms(prefill), "decode_step_ms": _ms(decode), "kv_cache_bytes": sizes[id(v)],
        "ratios": {"prefill": prefill.p50 / base_prefill.p50, "decode_step": decode.p50 / base_decode.p50,
                   "kv_cache": sizes[id(v)] / sizes[id(base)]},
    }  # fmt: skip
    if shape is not None:
        base_length = int(cases[id(base)].attention_mask.sum(1).float().mean())
        ideal = cost_model.prefill_flops(shape, length) / cost_model.prefill_flops(shape, base_length)
        full = cost_model.SHAPES[shape_name]
        row["cost_model"] = {"ideal_prefill_ratio": ideal, "full_shape": cost_model.costs(full, length, 0)}
    return row


def _ms(latency: Latency) -> dict[str, float]:
    return {"p10": 1000 * latency.p10, "p50": 1000 * latency.p50, "p90": 1000 * latency.p90}


def answer_fidelity(lm, variants: list[Variant], outputs: dict[int, ReducedTokens], s: BenchSettings) -> dict:
    """KL(baseline || variant) of the next-token distribution and agreement of greedy answers."""
    from ..lm.splice import splice

    base = baseline_of(variants[0], variants)
    prompts = lm.encode(s.prompts)
    result: dict[str, dict[str, float]] = {}
    answers: dict[int, list[list[int]]] = {}
    logprobs: dict[int, torch.Tensor] = {}
    for v in variants:
        out = outputs[id(v)]
        images = torch.arange(len(out.lengths)).repeat_interleave(len(prompts))
        reduced = select_rows(out, images, lm.embed.weight.device)
        batch = splice(lm.embed, lm.bos_id, reduced, prompts * len(out.lengths))
        logprobs[id(v)] = lm.next_token_logits(batch).float().log_softmax(-1)
        answers[id(v)] = lm.greedy(batch, s.max_new_tokens)
    for v in variants:
        kl = F.kl_div(logprobs[id(v)], logprobs[id(base)], log_target=True, reduction="none").sum(-1)
        same = [a == b for a, b in zip(answers[id(v)], answers[id(base)], strict=True)]
        result[v.label] = {"next_token_kl": float(kl.mean()), "greedy_agreement": sum(same) / len(same)}
    return result


def embedded_accuracy(model_dir: Path, variants: list[Variant], s: BenchSettings, phases: Phases) -> dict[str, dict]:
    """Held-out VQA accuracy when the model is the embedded LLaVA (torch variants)."""
    from ..zoo import LLAVA_DIR

    if model_dir.resolve() != LLAVA_DIR.resolve() or s.vqa_images < 1:
        return {}
    from ..encoder import ReducedVisionEncoder
    from ..finetune.bundle import load_finetuned_lm
    from ..lm.llava_lm import LlavaLm
    from ..zoo.vqa import vqa_accuracy

    lm = LlavaLm.from_pretrained(model_dir)
    scores = {}
    for v in variants:
        if v.backend == "torch" and v.label not in scores:
            encoder = ReducedVisionEncoder.from_pretrained(model_dir, v.method, positions=v.positions, **v.params)
            answerer = lm
            if v.regime == "fine-tuned":  # its adapters in the LM and its trained projector
                answerer = load_finetuned_lm(v.source)
                encoder.projector = answerer.model.model.multi_modal_projector
            with phases.phase(f"held-out accuracy of {v.label}, {s.vqa_images} images", s.vqa_images) as advance:
                score = vqa_accuracy(encoder, answerer, images=s.vqa_images, progress=advance)
            scores[v.label] = {"vqa_accuracy": score.accuracy["overall"], "vqa_by_type": score.accuracy}
    return scores


def memory_ratio(variant: dict[str, Any], baseline: dict[str, Any]) -> float | None:
    """Variant / baseline memory increase; None where the baseline's increase is below 1 MiB (the resolution of
    a process-wide reading: a ratio of two near-zero numbers means nothing)."""
    if baseline["increase_mib"] < 1:
        return None
    return variant["increase_mib"] / baseline["increase_mib"]


def select_rows(out: ReducedTokens, rows: torch.Tensor, device: torch.device) -> ReducedTokens:
    """Rows `rows` of a reduced batch, on `device` (an ONNX Runtime variant's outputs are on the CPU, the LLM may
    not be)."""
    rows = rows.to(out.tokens.device)
    return ReducedTokens(out.tokens[rows].to(device), out.lengths[rows].to(device), out.indices[rows].to(device),
                         span=out.span)  # fmt: skip
