"""Reducer and tower speed: our vectorised PruMerge against the spec-literal loop, and tower + reducer
against the plain tower forward with output_hidden_states=True, on a ViT-L/14-336-shaped random CLIP."""

from __future__ import annotations

import json
import sys
from functools import partial

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from prumerge_cli import atomic
from prumerge_cli.bench.timing import interleaved
from prumerge_cli.models.tower import VisionTower
from prumerge_cli.reducers import build_reducer
from tests.official_reference import reference_reduce
from tests.test_reducer_parity import synthetic_signals

VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
VIT_L_336.update(image_size=336, patch_size=14)


def reducer_vs_loop(iters: int) -> dict[str, float]:
    """B=1, N=576, C=1024."""
    signals = synthetic_signals(batch=1, n=576, c=1024, seed=0)
    x, a, k = signals.features[0], signals.scores[0], signals.keys[0]
    out: dict[str, float] = {}
    for method, plus in (("prumerge", False), ("prumerge+", True)):
        reducer = build_reducer(method)
        fns = {"ours": partial(reducer, signals), "loop": partial(reference_reduce, x, a, k, plus)}
        times = interleaved(fns, iters)
        ours, loop = 1000 * times["ours"].p50, 1000 * times["loop"].p50
        tokens = int(reducer(signals).lengths[0])
        print(f"{method:10s} tokens={tokens:4d}  ours {ours:8.2f} ms  loop {loop:8.2f} ms  speed-up x{loop / ours:.1f}")
        out[f"{method}_ours_ms"], out[f"{method}_loop_ms"] = ours, loop
    return out


def tower_plus_reducer(batches: list[int], iters: int) -> dict[str, float]:
    """Plain full forward with all hidden states vs our truncated tower + PruMerge."""
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**VIT_L_336)).eval()
    tower = VisionTower(model, "clip", feature_layer=-2)
    reducer = build_reducer("prumerge")
    out: dict[str, float] = {}
    for batch in batches:
        px = torch.randn(batch, 3, 336, 336)

        def plain(px=px):
            return model(pixel_values=px, output_hidden_states=True).hidden_states[-2]

        def reduced(px=px):
            return reducer(tower(px))

        with torch.no_grad():
            times = interleaved({"plain": plain, "ours": reduced}, iters)
        p, o = 1000 * times["plain"].p50, 1000 * times["ours"].p50
        print(f"batch {batch}: plain tower {p:9.1f} ms  tower+prumerge {o:9.1f} ms  ratio {o / p:.3f}")
        out[f"b{batch}_plain_ms"], out[f"b{batch}_ours_ms"] = p, o
    return out


def main() -> None:
    """Print the figures and write them to benchmarks/reducer_speed.json (or argv[1])."""
    results = {"threads": torch.get_num_threads(), **reducer_vs_loop(iters=5), **tower_plus_reducer([1, 8], iters=3)}
    path = sys.argv[1] if len(sys.argv) > 1 else "reducer_speed.json"
    atomic.write_text(path, json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
