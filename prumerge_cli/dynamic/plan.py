"""Memory per GPU of a `compress --method dynamic` run, from the model's config alone (weights are not read):
weights, gradients, optimizer states and activations, for the precision, batch, sequence length, GPU count and
what is trained. The run is refused when the plan does not fit.

Accounting (bytes; P = parameters of a part, B = batch per GPU, T = sequence length, L layers, H hidden,
I MLP width, V vocabulary, b = bytes of the compute dtype):
- weights: trained parts in fp32 (the optimizer's master copy); a frozen LM in the compute dtype, the vision
  tower and a frozen projector in fp32;
- gradients 4 P and AdamW moments 8 P of the trained parts;
- sharding: with FSDP (the LM trained on several GPUs) the trained parts' weights, gradients and moments are
  split over the GPUs, and two layers at a time are gathered whole in the compute dtype;
- activations kept for backward: per layer B T (6 H + 3 I) b (q, k, v, attention output, two norm outputs
  and the MLP's three intermediates), in every layer backward runs through (all when the LM is trained, from
  the predictors' layer on otherwise), or only each layer's input B T H b plus one layer's
  activations with gradient checkpointing; the masked softmax is chunked, so no `[B, heads, T, T]` is kept;
- logits: B T V in the compute dtype, plus their fp32 copy and its gradient for the cross-entropy;
- a fixed 1.5 GiB for the CUDA context, kernels and allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from ..errors import PrumergeError
from .config import SparseConfig
from .predictors import Predictors
from .training import TrainOptions

GIB = 2**30
RESERVED = int(1.5 * GIB)
"""CUDA context, kernels and allocator slack."""


@dataclass(frozen=True)
class Plan:
    """Bytes per GPU by kind, and whether it fits `gpu_bytes`."""

    rows: dict[str, int]
    gpus: int
    gpu_bytes: int
    sharding: str

    @property
    def total(self) -> int:
        """Bytes per GPU."""
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        """Whether the total fits the GPU."""
        return self.total <= self.gpu_bytes

    def text(self) -> str:
        """A table in plain text."""
        lines = [f"memory per GPU ({self.gpus} GPU{'s' if self.gpus > 1 else ''}, {self.sharding}):"]
        lines += [f"  {name:<22} {size / GIB:8.2f} GiB" for name, size in self.rows.items()]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {'total':<22} {self.total / GIB:8.2f} GiB of {self.gpu_bytes / GIB:.0f} GiB: {verdict}")
        return "\n".join(lines)


def part_sizes(model_dir: Path, config: SparseConfig) -> dict[str, int]:
    """Parameter counts of the vision tower, projector, LM (with its head) and predictors, from config.json."""
    llava = LlavaConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {
        "vision": count(model.model.vision_tower),
        "projector": count(model.model.multi_modal_projector),
        "llm": count(model.model.language_model) + count(model.lm_head),
        "predictors": count(Predictors(llava.text_config.hidden_size, config)),
    }


def plan_memory(model_dir: Path, config: SparseConfig, options: TrainOptions, seq_len: int, gpus: int,
                gpu_bytes: int) -> Plan:  # fmt: skip
    """The memory plan of a run of `options` on `gpus` GPUs of `gpu_bytes` each, sequences of `seq_len`."""
    if seq_len < 1 or gpus < 1:
        raise PrumergeError("--seq-len and --gpus must be positive")
    text = LlavaConfig.from_pretrained(str(model_dir)).text_config
    sizes = part_sizes(model_dir, config)
    low = 4 if options.precision == "fp32" else 2
    trained = {"predictors", *(["projector"] if options.train_projector else []),
               *(["llm"] if options.train_llm else [])}  # fmt: skip
    trainable = sum(sizes[k] for k in trained)
    frozen = sum(sizes[k] * (low if k == "llm" else 4) for k in sizes if k not in trained)
    sharding = "FSDP" if options.train_llm and gpus > 1 else ("DDP" if gpus > 1 else "one GPU")
    split = gpus if sharding == "FSDP" else 1
    b, t, h, i, layers = options.batch_size, seq_len, text.hidden_size, text.intermediate_size, text.num_hidden_layers
    per_layer = b * t * (6 * h + 3 * i) * low
    if not options.train_llm:  # backward runs only from the predictors' layer up
        layers -= config.sparse_layer
    activations = layers * b * t * h * low + per_layer if options.gradient_checkpointing else layers * per_layer
    rows = {
        "weights, trained": 4 * trainable // split,
        "weights, frozen": frozen,
        "gradients": 4 * trainable // split,
        "optimizer (AdamW)": 8 * trainable // split,
        "gathered layers": 2 * low * sizes["llm"] // layers if sharding == "FSDP" else 0,
        "activations": activations,
        "logits and loss": b * t * text.vocab_size * (low + 8),
        "CUDA context, slack": RESERVED,
    }
    return Plan(rows, gpus, gpu_bytes, sharding)


def gpu_memory(gpu_memory_gib: float | None, device_type: str) -> int:
    """The memory of one GPU: the flag's value, else the visible GPU's."""
    if gpu_memory_gib is not None:
        if gpu_memory_gib <= 0:
            raise PrumergeError("--gpu-memory must be positive")
        return int(gpu_memory_gib * GIB)
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    raise PrumergeError("--plan needs --gpu-memory GIB when no GPU is visible")
