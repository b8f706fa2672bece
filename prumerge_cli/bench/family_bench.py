"""`prumerge bench` on family checkpoints (LLaVA-NeXT, OneVision, InternVL, Gemma 3): each variant beside the
unreduced model, interleaved: the tokens the LM receives per image (kept plus newlines) of the stock count, the
encoder's time per image (tower, score, reduction, projector), and the LM's prefill cost through the cost model
at the real LM's shape."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console

from ..bundle import is_bundle, load
from ..errors import PrumergeError
from ..exporters.onnx_export import OnnxOptions
from ..families.layout import ImageTokens
from ..families.model import FamilyEncoder
from ..models.images import collect_images, open_image
from ..progress import Phases
from ..reducers import build_reducer
from ..tables import FoldingTable
from .cost_model import LLAVA_TEXT_TOKENS, prefill_flops, shape_named
from .runner import BenchSettings, machine
from .timing import interleaved

USUAL_SIZES = {"llava_next": [(672, 672)], "llava_onevision": [(768, 768)], "internvl": [(896, 896)],
               "gemma3": [(896, 896)], "qwen2_5_vl": [(448, 448), (896, 896), (1344, 1344)],
               "qwen3_vl": [(448, 448), (896, 896), (1344, 1344)]}  # fmt: skip
"""(width, height) the world images are resized to where no --images are given: LLaVA-NeXT's 2x2 tiles of
336 px (2,928 tokens with newlines), OneVision's 2x2 of 384 px, InternVL's 2x2 of 448 px and a thumbnail,
Gemma 3's one 896 px image, Qwen2.5-VL at three resolutions (its token count grows with the pixels)."""
FAMILY_LM = {"llava_next": "vicuna-7b", "llava_onevision": "qwen2-7b", "internvl": "qwen2.5-7b",
             "gemma3": "gemma-3-4b", "qwen2_5_vl": "qwen2.5-7b", "qwen3_vl": "qwen3-8b"}  # fmt: skip
"""The LM shape each family's usual 7B-class release has (cost model, when no --llm-shape is given)."""


def family_images(family: str, images: Path | None, synthetic: int | None) -> list[tuple[str, list[Image.Image]]]:
    """(what they are, images): the images of `--images`, or held-out world images at each usual size."""
    if images is not None:
        paths = collect_images([images])
        return [(f"{len(paths)} images from {images}", [open_image(p) for p in paths])]
    count = 8 if synthetic is None else synthetic
    if count < 1:
        raise PrumergeError("--synthetic needs at least 1 image")
    from ..zoo.world import samples_of

    pictures = [s.image for s in samples_of("test", 0, count)]
    groups = []
    for w, h in USUAL_SIZES[family]:
        resized = [p.resize((w, h), Image.Resampling.BICUBIC) for p in pictures]
        groups.append((f"{count} held-out procedural-world images at {w}x{h}", resized))
    return groups


def variants_of(targets: list[Path], s: BenchSettings) -> dict[str, FamilyEncoder]:
    """Name -> encoder: for a model directory its unreduced baseline and each of `s.methods`; a bundle as it is
    (beside its model's baseline)."""
    out: dict[str, FamilyEncoder] = {}
    for target in targets:
        if is_bundle(target):
            encoder = load(target, model_dir=s.model, full_hash=s.full_hash)
            if not isinstance(encoder, FamilyEncoder):
                raise PrumergeError(f"{target} is not a bundle of a family checkpoint; bench them apart")
            out.setdefault("none", encoder.with_reducer(build_reducer("none")))
            out[target.name] = encoder
            continue
        base = FamilyEncoder.from_pretrained(target, "none", dtype=s.dtype, positions=s.positions)
        out.setdefault("none", base)
        for method in s.methods:
            encoder = base.with_reducer(build_reducer(method))
            out[encoder.method_label] = encoder
    families = {encoder.family for encoder in out.values()}
    if len(families) > 1:
        raise PrumergeError(f"bench one family at a time, not {', '.join(sorted(families))}")
    return out


Encode = Callable[[tuple[torch.Tensor, dict[str, Any]]], list[ImageTokens]]
"""What a variant does with one prepared batch (the image processor's outputs): the timed work, tower to packing."""


def encoders_of(variants: dict[str, FamilyEncoder], backends: list[str], workdir: Path,
                phases: Phases) -> dict[tuple[str, str], Encode]:  # fmt: skip
    """(variant, backend) -> its encode: torch runs the encoder, ort the variant's tile graph, exported into
    `workdir` (Gemma 3 and InternVL, scope tile)."""
    out: dict[tuple[str, str], Encode] = {}
    if "torch" in backends:
        for name, e in variants.items():
            out[name, "torch"] = lambda p, e=e: e.encode_prepared(*p)
    if "ort" in backends:
        from ..exporters.family_onnx import check_family_export, export_family_onnx
        from ..runtime.family_ort import FamilyOrtEncoder

        options = OnnxOptions(check=False)
        for e in variants.values():
            check_family_export(e.family, e.scope, options)
        with phases.phase(f"exporting {len(variants)} tile graphs for ort", len(variants)) as advance:
            for i, (name, e) in enumerate(variants.items()):
                export_family_onnx(e, workdir / str(i), options)
                out[name, "ort"] = lambda p, o=FamilyOrtEncoder(workdir / str(i)): o.encode_prepared(*p)
                advance()
    return out


def run_family_bench(targets: list[Path], groups: list[tuple[str, list[Image.Image]]], s: BenchSettings,
                     phases: Phases) -> dict[str, Any]:  # fmt: skip
    """Counts, interleaved timing and the prefill cost of every variant on each backend, per image group and batch
    size; ratios are to `none` on the same backend."""
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    variants = variants_of(targets, s)
    family = next(iter(variants.values())).family
    shape_name, shape = shape_named(s.llm_shape or FAMILY_LM[family])
    rows = []
    with tempfile.TemporaryDirectory(prefix="prumerge-bench-") as workdir:
        encoders = encoders_of(variants, s.backends, Path(workdir), phases)
        for (source, images), batch in ((g, b) for g in groups for b in s.batch_sizes):
            chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
            prepared = [next(iter(variants.values())).prepare(chunk) for chunk in chunks]
            counted = {key: [t for p in prepared for t in encode(p)] for key, encode in encoders.items()}
            rounds = s.warmup + s.iters
            with phases.phase(f"timing {len(encoders)} variants, batch {batch}, {source}", rounds) as advance:
                times = interleaved({f"{n} [{b}]": (lambda f=f, ps=prepared: [f(p) for p in ps])
                                     for (n, b), f in encoders.items()}, s.iters, s.warmup,
                                    on_round=lambda: advance(1))  # fmt: skip
            base_flops = prefill_flops(shape, round(mean_tokens(counted["none", s.backends[0]])) + LLAVA_TEXT_TOKENS)
            for (name, backend), found in counted.items():
                tokens = mean_tokens(found)
                flops = prefill_flops(shape, round(tokens) + LLAVA_TEXT_TOKENS)
                ms = 1000 * times[f"{name} [{backend}]"].p50 / len(images)
                base_ms = 1000 * times[f"none [{backend}]"].p50 / len(images)
                rows.append({"variant": name, "backend": backend, "images": source, "batch": batch,
                             "tokens": tokens, "stock_tokens": sum(t.span for t in found) / len(found),
                             "newlines": sum(len(t.tokens) - sum(t.kept_per_tile) for t in found) / len(found),
                             "ms_per_image": ms, "latency_ratio": ms / base_ms, "prefill_tflops": flops / 1e12,
                             "prefill_ratio": flops / base_flops})  # fmt: skip
    return {"family": family, "targets": [str(t) for t in targets], "images": [g[0] for g in groups],
            "llm_shape": shape_name,
            "text_tokens": LLAVA_TEXT_TOKENS, "settings": {"batch_sizes": s.batch_sizes, "iters": s.iters,
                                                           "warmup": s.warmup, "threads": torch.get_num_threads(),
                                                           "backends": s.backends},
            "machine": machine(), "family_rows": rows}  # fmt: skip


def mean_tokens(images: list[ImageTokens]) -> float:
    """The mean count of tokens the LM receives per image."""
    return sum(len(t.tokens) for t in images) / len(images)


def print_family_tables(report: dict[str, Any], console: Console) -> None:
    """One table per image group and batch size: counts, time per image and prefill cost, each with its ratio to
    `none`."""
    for source, batch in ((g, b) for g in report["images"] for b in report["settings"]["batch_sizes"]):
        title = (f"{report['family']}, batch {batch}, {source}: ratio = variant / none; prefill at "
                 f"{report['llm_shape']} with {report['text_tokens']} text tokens (cost model)")  # fmt: skip
        table = FoldingTable(title, ["variant", "backend", "LM tokens", "of stock", "newlines", "ms/image",
                                     "prefill TFLOPs"])  # fmt: skip
        for row in (r for r in report["family_rows"] if r["batch"] == batch and r["images"] == source):
            table.add_row(row["variant"], row["backend"], f"{row['tokens']:.1f}", f"{row['stock_tokens']:.0f}",
                          f"{row['newlines']:.1f}", f"{row['ms_per_image']:.1f} x{row['latency_ratio']:.2f}",
                          f"{row['prefill_tflops']:.2f} x{row['prefill_ratio']:.2f}")  # fmt: skip
        table.print(console)
