"""Training of the predictors (optionally the projector and LM too): hard Gumbel-softmax with the
straight-through estimator, masked softmax in layers >= l, keep-rate losses, optional distillation, exact
resume from checkpoints, and `torchrun` data parallelism through the same entry point."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import atomic
from ..encoder import ReducedVisionEncoder, project_tokens
from ..errors import PrumergeError
from ..lm.splice import IGNORE, LmBatch, splice
from ..models.images import open_image, preprocess
from ..reducers import ReducedTokens, build_reducer
from .data import Example
from .distributed import Rank
from .model import IMAGE_START, DynamicLlava, TrainForward

CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_STATE = "state.pt"


@dataclass(frozen=True)
class TrainOptions:
    """Steps, batch, learning rates, what is trained, distillation weights, checkpointing and seed."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-4
    llm_lr: float = 5e-6
    train_projector: bool = False
    train_llm: bool = False
    distill_kl: float = 0.0
    distill_prumerge: float = 0.0
    save_every: int = 50
    warmup: float = 0.03
    seed: int = 0


@dataclass
class StepLog:
    """What one step reports."""

    step: int
    loss: float
    ce: float
    image_keep: float
    output_keep: float
    output_rows: int = 0


class Trainee(nn.Module):
    """The trainable parts as one module (what DistributedDataParallel wraps); forward = the masked form."""

    def __init__(self, dynamic: DynamicLlava):
        super().__init__()
        self.dynamic = dynamic
        self.predictors = dynamic.predictors
        self.model = dynamic.lm.model

    def forward(self, batch: LmBatch, image_lengths: torch.Tensor, answers: torch.Tensor, tau: float) -> TrainForward:
        return self.dynamic.train_forward(batch, image_lengths, answers, tau)


def temperature(step: int, steps: int) -> float:
    """Gumbel temperature: 0.1 ** (step / steps), from 1 down to 0.1."""
    return 0.1 ** (step / steps)


def learning_rate_scale(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up then cosine decay."""
    ramp = max(1, int(steps * warmup))
    return min(1.0, (step + 1) / ramp) * 0.5 * (1 + math.cos(math.pi * step / steps))


def batch_indices(step: int, size: int, examples: int, seed: int, rank: Rank) -> list[int]:
    """This rank's share of global batch `step`: a seeded reshuffle per epoch, ranks interleaved."""
    out = []
    for j in range(rank.rank, size * rank.world, rank.world):
        position = step * size * rank.world + j
        epoch, offset = divmod(position, examples)
        order = torch.randperm(examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(order[offset]))
    return out


def trainable_parameters(dynamic: DynamicLlava, options: TrainOptions) -> dict[str, list[nn.Parameter]]:
    """Set requires_grad (predictors always; projector / LM on request) and group the parameters by rate."""
    model = dynamic.lm.model
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(options.train_projector)
    if options.train_llm:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    dynamic.predictors.requires_grad_(True)
    return {
        "predictors": list(dynamic.predictors.parameters()),
        "model": [p for p in model.parameters() if p.requires_grad],
    }


def trainable_state(dynamic: DynamicLlava, options: TrainOptions) -> dict[str, torch.Tensor]:
    """Tensors a checkpoint or bundle stores: predictors (`predictors.*`) and any trained model part."""
    state = {f"predictors.{k}": v.detach().clone().contiguous() for k, v in dynamic.predictors.state_dict().items()}
    if options.train_projector or options.train_llm:
        for name, p in dynamic.lm.model.named_parameters():
            if p.requires_grad:
                state[f"model.{name}"] = p.detach().clone().contiguous()
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


class Trainer:
    """Runs the optimisation; `run` returns the per-step log (including steps restored from a checkpoint)."""

    def __init__(self, dynamic: DynamicLlava, encoder: ReducedVisionEncoder, examples: list[Example],
                 options: TrainOptions, rank: Rank, checkpoint_dir: Path):  # fmt: skip
        self.dynamic = dynamic
        self.encoder = encoder
        self.examples = examples
        self.options = options
        self.rank = rank
        self.checkpoint_dir = checkpoint_dir
        self.prumerge = build_reducer("prumerge") if options.distill_prumerge > 0 else None
        if self.prumerge is not None and not dynamic.vision:
            raise PrumergeError("--distill-prumerge needs the vision predictor (vision source 'predictor')")
        groups = trainable_parameters(dynamic, options)
        self.params = groups["predictors"] + groups["model"]
        param_groups = [{"params": groups["predictors"], "lr": options.lr, "base": options.lr}]
        if groups["model"]:
            param_groups.append({"params": groups["model"], "lr": options.llm_lr, "base": options.llm_lr})
        self.optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
        trainee = Trainee(dynamic)
        self.module: nn.Module = trainee
        if rank.world > 1:
            frozen = [n for n, p in trainee.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in trainee.named_buffers()]  # every rank loaded the same checkpoint
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(trainee, frozen)
            self.module = DistributedDataParallel(trainee, find_unused_parameters=True)
        self.history: list[StepLog] = []
        self.start = 0

    def inputs(self, step: int) -> tuple[LmBatch, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Spliced batch, image lengths, final-answer mask and (for PruMerge distillation) the target mask."""
        picked = [self.examples[i] for i in batch_indices(step, self.options.batch_size, len(self.examples),
                                                           self.options.seed, self.rank)]  # fmt: skip
        pixels = preprocess(self.encoder.processor, [open_image(e.image) for e in picked]).to(self.rank.device)
        with torch.no_grad():
            signals = self.encoder.tower(pixels, with_scores=self.encoder.reducer.needs_scores or bool(self.prumerge))
            reduced = self.encoder.reducer(signals)
            target = None
            if self.prumerge is not None:
                chosen = self.prumerge(signals).indices
                target = torch.zeros(signals.features.shape[:2], device=chosen.device)
                target.scatter_(1, chosen.clamp_min(0), (chosen >= 0).to(target.dtype))
        projector = self.dynamic.lm.model.model.multi_modal_projector
        image = ReducedTokens(project_tokens(projector, reduced.tokens, reduced.lengths), reduced.lengths,
                              reduced.indices)  # fmt: skip
        batch = splice(self.dynamic.lm.embed, self.dynamic.lm.bos_id, image, [e.text for e in picked],
                       [e.targets for e in picked])  # fmt: skip
        ar = torch.arange(batch.inputs_embeds.shape[1], device=pixels.device)[None, :]
        start = torch.tensor(
            [IMAGE_START + int(n) + e.answer_start for n, e in zip(image.lengths, picked, strict=True)]
        )
        end = torch.tensor([IMAGE_START + int(n) + len(e.text) for n, e in zip(image.lengths, picked, strict=True)])
        answers = (ar >= start[:, None].to(ar.device)) & (ar < end[:, None].to(ar.device))
        return batch, image.lengths, answers, target

    def loss(self, step: int) -> tuple[torch.Tensor, StepLog]:
        """The training loss of global step `step` on this rank's share."""
        opt, cfg = self.options, self.dynamic.config
        batch, lengths, answers, target = self.inputs(step)
        out: TrainForward = self.module(batch, lengths, answers, temperature(step, opt.steps))
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE)
        loss = ce
        image_keep = output_keep = 1.0
        if out.image_mask is not None:
            ratio = out.image_mask.mean(1)
            loss = loss + cfg.mask_loss_weight * ((cfg.vision_keep_rate - ratio) ** 2).mean()
            image_keep = float(ratio.detach().mean())
        rows = out.output_sparse.any(1)
        if bool(rows.any()):
            counted = out.output_sparse.to(out.output_mask.dtype)
            ratio = (out.output_mask * counted).sum(1) / counted.sum(1).clamp_min(1)
            gap = torch.where(rows, (cfg.output_keep_rate - ratio) ** 2, torch.zeros_like(ratio))
            loss = loss + cfg.mask_loss_weight * gap.mean()
            output_keep = float(ratio.detach()[rows].mean())
        if opt.distill_kl > 0:
            loss = loss + opt.distill_kl * self.distillation_kl(batch, out.logits)
        if target is not None and out.image_logits is not None:
            keep_p = torch.softmax(out.image_logits.float(), -1)[..., 0]
            loss = loss + opt.distill_prumerge * F.binary_cross_entropy(keep_p, target)
        return loss, StepLog(step, loss.item(), ce.item(), image_keep, output_keep, int(rows.sum()))

    def distillation_kl(self, batch: LmBatch, logits: torch.Tensor) -> torch.Tensor:
        """KL(full-token model || sparse model) of the next-token distributions at the labelled positions."""
        with torch.no_grad():
            teacher = self.dynamic.lm.logits(batch)
        where = batch.labels != IGNORE
        student = torch.log_softmax(logits[where].float(), -1)
        return F.kl_div(student, torch.log_softmax(teacher[where].float(), -1), log_target=True, reduction="batchmean")

    def run(self, on_step: Callable[[StepLog], None] | None = None) -> list[StepLog]:
        """Train from `self.start` to the last step, checkpointing every `save_every` steps."""
        opt = self.options
        self.dynamic.predictors.train()
        self.dynamic.lm.model.train(opt.train_llm)
        for step in range(self.start, opt.steps):
            scale = learning_rate_scale(step, opt.steps, opt.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base"] * scale
            loss, log = self.loss(step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.history.append(log)
            if (step + 1) % opt.save_every == 0 and step + 1 < opt.steps:
                self.save_checkpoint(step + 1)
            if on_step is not None:
                on_step(log)
        self.dynamic.predictors.eval()
        self.dynamic.lm.model.eval()
        return self.history

    def rng_states(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's random-number state (CPU, and CUDA when on a GPU), in rank order."""
        state = {"cpu": torch.get_rng_state()}
        if self.rank.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.rank.device)
        if self.rank.world == 1:
            return [state]
        gathered: list = [None] * self.rank.world
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def save_checkpoint(self, next_step: int) -> None:
        """Weights (safetensors) and optimizer / RNG / step / log (tensors and plain values only)."""
        rng = self.rng_states()
        if not self.rank.main:
            return
        with atomic.atomic_dir(self.checkpoint_dir, force=True) as tmp:
            save_file(trainable_state(self.dynamic, self.options), str(tmp / CHECKPOINT_WEIGHTS))
            state = {
                "next_step": next_step,
                "optimizer": self.optimizer.state_dict(),
                "rng": rng,
                "history": [vars(h) for h in self.history],
                "steps": self.options.steps,
            }
            torch.save(state, tmp / CHECKPOINT_STATE)

    def resume(self) -> int:
        """Restore the latest checkpoint; returns the step training continues from."""
        weights, state_file = self.checkpoint_dir / CHECKPOINT_WEIGHTS, self.checkpoint_dir / CHECKPOINT_STATE
        if not weights.is_file() or not state_file.is_file():
            raise PrumergeError(f"--resume: no checkpoint in {self.checkpoint_dir}")
        state = torch.load(state_file, weights_only=True)
        if state["steps"] != self.options.steps:
            raise PrumergeError(f"--resume: the checkpoint was for {state['steps']} steps, not {self.options.steps}")
        load_trainable_state(self.dynamic, load_file(str(weights)))
        self.optimizer.load_state_dict(state["optimizer"])
        if len(state["rng"]) != self.rank.world:
            raise PrumergeError(f"--resume: the checkpoint was written by {len(state['rng'])} processes")
        rng = state["rng"][self.rank.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.rank.device)
        self.history = [StepLog(**h) for h in state["history"]]
        self.start = int(state["next_step"])
        return self.start
