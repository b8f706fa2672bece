"""LoRA adapters on a LLaVA's language model (peft), with the official PruMerge settings as defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PrumergeError

LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama decoder layer: LLaVA's `find_all_linear_names` on the LM."""


@dataclass(frozen=True)
class LoraSettings:
    """Rank, scale, dropout and target layers (PruMerge's: r 128, alpha 256, dropout 0.05, all LM linears)."""

    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LINEAR_LAYERS

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise PrumergeError("--lora-rank and --lora-alpha must be positive and --lora-dropout in [0, 1)")
        unknown = set(self.targets) - set(LINEAR_LAYERS)
        if not self.targets or unknown:
            raise PrumergeError(f"--lora-targets takes some of {', '.join(LINEAR_LAYERS)}; got {sorted(unknown)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "targets": list(self.targets)}

    def peft_config(self):
        """peft's `LoraConfig` for the LM's decoder layers of a `LlavaForConditionalGeneration` only."""
        from peft import LoraConfig

        pattern = rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(self.targets)})"
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=pattern,
                          bias="none")  # fmt: skip


def attach_lora(model: nn.Module, settings: LoraSettings):
    """Wrap `model` in a peft model with fresh adapters (peft's initialisation: B = 0, so the model is
    unchanged until trained); the adapters are injected in place, so `model` itself now runs them."""
    from peft import get_peft_model

    return get_peft_model(model, settings.peft_config())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter weights of a model with LoRA attached."""
    return [p for name, p in model.named_parameters() if "lora_" in name]


def hold_frozen_lm_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen weights of a LLaVA's LM and head (everything but the adapters) to `dtype`, as a bf16 or fp16
    run holds its base model; the adapters stay in fp32 for the optimizer."""
    for module in (model.model.language_model, model.lm_head):
        for name, parameter in module.named_parameters():
            if "lora_" not in name:
                parameter.data = parameter.data.to(dtype)
