"""The reference benchmark: a randomly initialised ViT-L/14-336-shaped CLIP tower (saved once under out/),
every method on torch and ONNX Runtime at batch 1 and 8, and a 1-layer Vicuna-7B-shaped prefill
(one layer keeps a batch-8 prefill within minutes on 2 CPU cores; the cost model scales it to 32)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from .reducer_speed import VIT_L_336

MODEL = Path("out/vit-l-14-336-random")


def ensure_model() -> Path:
    """Save the random ViT-L/14-336 tower with save_pretrained, once."""
    if not (MODEL / "config.json").is_file():
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(**VIT_L_336)).save_pretrained(MODEL)
    return MODEL


def main() -> None:
    """Run `prumerge bench` on it and write bench.json and bench.png."""
    model = ensure_model()
    command = [
        sys.executable, "-m", "prumerge_cli", "bench", str(model), "--methods", "prumerge,prumerge+,topk,random,pool",
        "--backends", "torch,ort", "--batch-sizes", "1,8", "--synthetic", "8", "--warmup", "1", "--iters", "2",
        "--llm-shape", "vicuna-7b:layers=1", "--json", "bench.json", "--plot", "bench.png",
    ]  # fmt: skip
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
