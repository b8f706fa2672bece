"""Training of the Dynamic-LLaVA predictors (optionally the projector and LM too) on the shared loop: hard
Gumbel-softmax with the straight-through estimator, masked softmax in layers >= l, keep-rate losses and
optional distillation. Each sample's Gumbel noise depends on its place in the run only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..encoder import ReducedVisionEncoder, project_tokens
from ..errors import PrumergeError
from ..lm.splice import IGNORE, LmBatch, splice
from ..models.images import open_image, preprocess
from ..reducers import ReducedTokens, build_reducer
from ..training.conversations import Example
from ..training.distributed import Rank
from ..training.loop import StepLog, Trainer, TrainOptions
from ..training.sampling import gumbel_noise, temperature
from .attention import dynamic_attention_on
from .model import IMAGE_START, DynamicLlava, GumbelNoise, TrainForward
from .sharding import full_tensor, shard_trained_parts


class Trainee(nn.Module):
    """The trainable parts as one module (what DistributedDataParallel wraps); forward = the masked form."""

    def __init__(self, dynamic: DynamicLlava):
        super().__init__()
        self.dynamic = dynamic
        self.predictors = dynamic.predictors
        self.model = dynamic.lm.model

    def forward(self, batch: LmBatch, lengths: torch.Tensor, answers: torch.Tensor, tau: float, image_start: int,
                noise: GumbelNoise) -> TrainForward:  # fmt: skip
        return self.dynamic.train_forward(batch, lengths, answers, tau, image_start, noise)


@dataclass
class MicroBatch:
    """One process's share of one micro-batch, ready for the forward."""

    batch: LmBatch
    lengths: torch.Tensor
    answers: torch.Tensor
    image_start: int
    noise: GumbelNoise
    prumerge_target: torch.Tensor | None


def mark_trainable(dynamic: DynamicLlava, options: TrainOptions) -> None:
    """Set requires_grad: predictors always; projector / LM on request."""
    model = dynamic.lm.model
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(options.train_projector)
    if options.train_llm:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    dynamic.predictors.requires_grad_(True)


def trainable_parameters(dynamic: DynamicLlava) -> dict[str, list[nn.Parameter]]:
    """The parameters to optimise, grouped by learning rate."""
    model = dynamic.lm.model
    return {
        "predictors": list(dynamic.predictors.parameters()),
        "model": [p for p in model.parameters() if p.requires_grad],
    }


def trainable_state(dynamic: DynamicLlava, options: TrainOptions) -> dict[str, torch.Tensor]:
    """Tensors a checkpoint or bundle stores: predictors (`predictors.*`) and any trained model part (whole
    tensors: with FSDP every process must call this)."""
    state = {f"predictors.{k}": full_tensor(v).detach().clone().contiguous()
             for k, v in dynamic.predictors.state_dict().items()}  # fmt: skip
    if options.train_projector or options.train_llm:
        for name, p in dynamic.lm.model.named_parameters():
            if p.requires_grad:
                state[f"model.{name}"] = full_tensor(p).detach().clone().contiguous()
    return state


def load_trainable_state(dynamic: DynamicLlava, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `trainable_state`."""
    predictors = {k.removeprefix("predictors."): v for k, v in state.items() if k.startswith("predictors.")}
    dynamic.predictors.load_state_dict(predictors)
    model = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if model:
        missing = set(model) - set(dict(dynamic.lm.model.named_parameters()))
        if missing:
            raise PrumergeError(f"checkpoint tensors unknown to this model: {', '.join(sorted(missing)[:3])}")
        dynamic.lm.model.load_state_dict(model, strict=False)


class DynamicTrainer(Trainer):
    """The loop with the predictors' objective."""

    STATS = 6  # [loss, ce sum, image keep sum, image rows, output keep sum, output rows]

    def __init__(self, dynamic: DynamicLlava, encoder: ReducedVisionEncoder, examples: list[Example],
                 options: TrainOptions, rank: Rank, checkpoint_dir: Path, settings: dict[str, Any] | None = None,
                 resume: bool = False):  # fmt: skip
        """Set up the run; with `resume`, from the checkpoint in `checkpoint_dir` (`start` is its step)."""
        self.dynamic = dynamic
        self.encoder = encoder
        self.prumerge = build_reducer("prumerge") if options.distill_prumerge > 0 else None
        if self.prumerge is not None and not dynamic.vision:
            raise PrumergeError("--distill-prumerge needs the vision predictor (vision source 'predictor')")
        self.stock_attention = dynamic.decoder.config._attn_implementation
        super().__init__(examples, options, rank, checkpoint_dir, settings, resume)

    def prepare(self) -> None:
        mark_trainable(self.dynamic, self.options)
        if self.options.gradient_checkpointing:
            self.dynamic.lm.model.gradient_checkpointing_enable({"use_reentrant": False})

    def shard(self, dtype: torch.dtype | None) -> list[nn.Module]:
        return shard_trained_parts(self.dynamic, self.options.train_projector, dtype)

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        groups = trainable_parameters(self.dynamic)
        return [(groups["predictors"], self.options.lr), (groups["model"], self.options.llm_lr)]

    def make_trainee(self) -> nn.Module:
        return Trainee(self.dynamic)

    def state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.dynamic, self.options)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.dynamic, state)

    def train_mode(self, on: bool) -> None:
        self.dynamic.predictors.train(on)
        self.dynamic.lm.model.train(on and self.options.train_llm)
        if on and self.options.gradient_checkpointing:  # transformers checkpoints a layer only in training mode
            self.dynamic.decoder.layers.train()

    @contextmanager
    def step_context(self) -> Iterator[None]:
        """The layers' attention stays ours through backward, where gradient checkpointing recomputes them."""
        with dynamic_attention_on(self.dynamic.decoder.config):
            yield

    def step_log(self, step: int, stats: list[float], tokens: int) -> StepLog:
        loss, ce, image_sum, image_rows, output_sum, output_rows = stats
        metrics = {
            "image_keep": image_sum / image_rows if image_rows else 1.0,
            "output_keep": output_sum / output_rows if output_rows else 1.0,
            "output_rows": output_rows,
        }
        return StepLog(step, loss, ce / tokens, metrics)  # fmt: skip

    def inputs(self, step: int, micro: int) -> MicroBatch:
        """Spliced batch, image lengths, final-answer mask, Gumbel noise and the PruMerge target mask."""
        picked = self.picked(step, micro)
        examples = [e for _, e in picked]
        pixels = preprocess(self.encoder.processor, [open_image(e.image) for e in examples]).to(self.rank.device)
        with torch.no_grad():
            signals = self.encoder.tower(pixels, with_scores=self.encoder.reducer.needs_scores or bool(self.prumerge))
            reduced = self.encoder.reduce(signals)
            target = None
            if self.prumerge is not None:
                chosen = self.prumerge(signals).indices
                target = torch.zeros(signals.features.shape[:2], device=chosen.device)
                target.scatter_(1, chosen.clamp_min(0), (chosen >= 0).to(target.dtype))
        projector = self.dynamic.lm.model.model.multi_modal_projector
        image = ReducedTokens(project_tokens(projector, reduced.tokens, reduced.lengths), reduced.lengths,
                              reduced.indices, span=reduced.span)  # fmt: skip
        prefix = examples[0].prefix
        batch = splice(self.dynamic.lm.embed, self.dynamic.lm.bos_id, image, [e.text for e in examples],
                       [e.targets for e in examples], [e.prefix for e in examples])  # fmt: skip
        image_start = IMAGE_START + len(prefix)
        width = batch.inputs_embeds.shape[1]
        ar = torch.arange(width, device=pixels.device)[None, :]
        after = [image_start + int(n) for n in image.lengths]
        start = torch.tensor([a + e.answer_start for a, e in zip(after, examples, strict=True)], device=ar.device)
        end = torch.tensor([a + len(e.text) for a, e in zip(after, examples, strict=True)], device=ar.device)
        answers = (ar >= start[:, None]) & (ar < end[:, None])
        return MicroBatch(batch, image.lengths, answers, image_start,
                          self.noise(picked, image.lengths, width), target)  # fmt: skip

    def noise(self, picked: list[tuple[int, Example]], lengths: torch.Tensor, width: int) -> GumbelNoise:
        """Each sample's own Gumbel draws, padded to the batch."""
        draws = [gumbel_noise(self.options.seed, p, int(n), width) for (p, _), n in zip(picked, lengths, strict=True)]
        pad = lambda parts: torch.nn.utils.rnn.pad_sequence(parts, batch_first=True).to(self.rank.device)  # noqa: E731
        return GumbelNoise(pad([i for i, _ in draws]), pad([t for _, t in draws]))

    def micro_loss(self, step: int, micro: int, tokens: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's part of the global loss for one micro-batch (scaled so that DDP's mean over processes
        gives the global loss), and its statistics [loss, ce sum, image keep sum, image rows, output keep sum,
        output rows] for the log."""
        opt, cfg = self.options, self.dynamic.config
        m = self.inputs(step, micro)
        with self.autocast():
            out: TrainForward = self.module(m.batch, m.lengths, m.answers, temperature(step, opt.steps),
                                            m.image_start, m.noise)  # fmt: skip
        labels = m.batch.labels.flatten()
        ce_sum = F.cross_entropy(out.logits.flatten(0, 1).float(), labels, ignore_index=IGNORE, reduction="sum")
        loss = ce_sum / tokens
        zero = ce_sum.new_zeros(())
        image_sum = image_rows = output_sum = zero
        if out.image_mask is not None:
            ratio = out.image_mask.mean(1)
            loss = loss + cfg.mask_loss_weight * ((cfg.vision_keep_rate - ratio) ** 2).sum() / samples
            image_sum, image_rows = ratio.detach().sum(), zero + len(ratio)
        rows = out.output_sparse.any(1)
        if bool(rows.any()):
            counted = out.output_sparse.to(out.output_mask.dtype)
            ratio = (out.output_mask * counted).sum(1) / counted.sum(1).clamp_min(1)
            gap = torch.where(rows, (cfg.output_keep_rate - ratio) ** 2, torch.zeros_like(ratio))
            loss = loss + cfg.mask_loss_weight * gap.sum() / samples
            output_sum = ratio.detach()[rows].sum()
        if opt.distill_kl > 0:
            loss = loss + opt.distill_kl * self.distillation_kl(m.batch, out.logits) / tokens
        if m.prumerge_target is not None and out.image_logits is not None:
            keep_p = torch.softmax(out.image_logits.float(), -1)[..., 0]
            bce = F.binary_cross_entropy(keep_p, m.prumerge_target, reduction="sum") / keep_p.shape[1]
            loss = loss + opt.distill_prumerge * bce / samples
        stats = torch.stack([loss.detach(), ce_sum.detach(), image_sum, image_rows, output_sum, zero + rows.sum()])
        return loss * self.rank.world, stats

    def distillation_kl(self, batch: LmBatch, logits: torch.Tensor) -> torch.Tensor:
        """Summed KL(full-token model || sparse model) of the next-token distributions at labelled positions."""
        with torch.no_grad(), dynamic_attention_on(self.dynamic.decoder.config, self.stock_attention):
            teacher = self.dynamic.lm.logits(batch)
        where = batch.labels != IGNORE
        student = torch.log_softmax(logits[where].float(), -1)
        return F.kl_div(student, torch.log_softmax(teacher[where].float(), -1), log_target=True, reduction="sum")
