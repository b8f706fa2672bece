"""The fine-tuning objective on the shared loop: every step feeds the LM the reducer's tokens (projected by the
trained projector), LoRA adapters train in the LM, the vision tower stays frozen, and the loss is the
answers' cross-entropy. Text-only records train as text (no image tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from ..encoder import ReducedVisionEncoder, project_tokens
from ..errors import PrumergeError
from ..lm.llava_lm import LlavaLm
from ..lm.splice import IGNORE, LmBatch, splice
from ..models.images import open_image, preprocess
from ..reducers import ReducedTokens
from ..training.conversations import Example
from ..training.distributed import Rank
from ..training.loop import Trainer, TrainOptions
from .lora import lora_parameters

ADAPTER_PREFIX = "lora."
PROJECTOR_PREFIX = "projector."


class Trainee(nn.Module):
    """The LLaVA with its adapters (what DistributedDataParallel wraps); forward = logits of a spliced batch."""

    def __init__(self, lm: LlavaLm):
        super().__init__()
        self.lm = lm
        self.model = lm.model

    def forward(self, batch: LmBatch) -> torch.Tensor:
        return self.lm.logits(batch)


class FinetuneTrainer(Trainer):
    """LoRA on the LM and the projector in full, with `encoder`'s reducer active."""

    def __init__(self, lm: LlavaLm, peft_model: nn.Module, encoder: ReducedVisionEncoder, examples: list[Example],
                 options: TrainOptions, rank: Rank, checkpoint_dir: Path, settings: dict[str, Any] | None = None,
                 resume: bool = False):  # fmt: skip
        """`peft_model` wraps `lm.model` (adapters attached); `encoder` uses `lm.model`'s projector."""
        if options.train_llm:
            raise PrumergeError("a LoRA fine-tune trains adapters, not the whole LM")
        self.lm = lm
        self.peft_model = peft_model
        self.encoder = encoder
        self.projector = lm.model.model.multi_modal_projector
        super().__init__(examples, options, rank, checkpoint_dir, settings, resume)

    def prepare(self) -> None:
        self.lm.model.requires_grad_(False)
        for p in lora_parameters(self.lm.model):
            p.requires_grad_(True)
        self.projector.requires_grad_(True)
        if self.options.gradient_checkpointing:
            self.lm.model.gradient_checkpointing_enable({"use_reentrant": False})

    def shard(self, dtype: torch.dtype | None) -> list[nn.Module]:
        raise PrumergeError("a LoRA fine-tune runs data parallel (DDP), without sharding")

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        return [(lora_parameters(self.lm.model), self.options.lr),
                (list(self.projector.parameters()), self.options.projector_lr)]  # fmt: skip

    def make_trainee(self) -> nn.Module:
        return Trainee(self.lm)

    def state(self) -> dict[str, torch.Tensor]:
        adapters = get_peft_model_state_dict(self.peft_model)
        state = {ADAPTER_PREFIX + k: v.detach().clone().contiguous() for k, v in adapters.items()}
        state.update({PROJECTOR_PREFIX + k: v.detach().clone() for k, v in self.projector.state_dict().items()})
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        adapters = {k.removeprefix(ADAPTER_PREFIX): v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
        result = set_peft_model_state_dict(self.peft_model, adapters)
        if getattr(result, "unexpected_keys", None):
            raise PrumergeError(f"checkpoint adapters unknown to this model: {result.unexpected_keys[:2]}")
        self.projector.load_state_dict(
            {k.removeprefix(PROJECTOR_PREFIX): v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
        )

    def train_mode(self, on: bool) -> None:
        self.lm.model.train(on)
        self.encoder.tower.eval()  # frozen, and without dropout

    def image_tokens(self, examples: list[Example]) -> ReducedTokens:
        """The reducer's tokens of each example's image, projected (with gradient into the projector); rows of
        text-only examples have none."""
        rows = [i for i, e in enumerate(examples) if e.image is not None]
        device, width = self.rank.device, self.lm.embed.weight.shape[1]
        lengths = torch.zeros(len(examples), dtype=torch.long, device=device)
        if not rows:
            empty = torch.zeros(len(examples), 0, width, device=device)
            return ReducedTokens(empty, lengths, torch.zeros(len(examples), 0, dtype=torch.long, device=device))
        pixels = preprocess(self.encoder.processor, [open_image(examples[i].image) for i in rows]).to(device)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the reducer as at inference, no autocast
            signals = self.encoder.tower(pixels, with_scores=self.encoder.reducer.needs_scores,
                                         score_dtype=self.encoder.score_dtype)  # fmt: skip
            reduced = self.encoder.reduce(signals)
        projected = project_tokens(self.projector, reduced.tokens, reduced.lengths)
        where = torch.tensor(rows, device=device)
        tokens = projected.new_zeros(len(examples), *projected.shape[1:]).index_copy(0, where, projected)
        indices = reduced.indices.new_zeros(len(examples), reduced.indices.shape[1])
        indices = indices.index_copy(0, where, reduced.indices)
        return ReducedTokens(tokens, lengths.index_copy(0, where, reduced.lengths.to(device)), indices,
                             span=reduced.span)  # fmt: skip

    def micro_loss(self, step: int, micro: int, tokens: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        examples = [e for _, e in self.picked(step, micro)]
        with self.autocast():
            image = self.image_tokens(examples)
            batch = splice(self.lm.embed, self.lm.bos_id, image, [e.text for e in examples],
                           [e.targets for e in examples], [e.prefix for e in examples])  # fmt: skip
            logits = self.module(batch)
        ce_sum = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE,
                                 reduction="sum")  # fmt: skip
        loss = ce_sum / tokens
        return loss * self.rank.world, torch.stack([loss.detach(), ce_sum.detach()])
