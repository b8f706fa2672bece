"""Training of the predictors (optionally the projector and LM too): hard Gumbel-softmax with the
straight-through estimator, masked softmax in layers >= l, keep-rate losses, optional distillation, mixed
precision, gradient accumulation and checkpointing, exact resume, and `torchrun` data parallelism.

Every loss term is normalised by its count over the whole global step (all processes, all accumulated
micro-batches), and the Gumbel noise of a sample depends on its place in the run only, so N processes, one
process accumulating N micro-batches and one process with an N times larger batch train the same weights."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..encoder import ReducedVisionEncoder, project_tokens
from ..errors import PrumergeError
from ..lm.splice import IGNORE, LmBatch, splice
from ..models.images import open_image, preprocess
from ..reducers import ReducedTokens, build_reducer
from .attention import dynamic_attention_on
from .checkpoints import load_checkpoint, save_checkpoint
from .data import Example
from .distributed import Rank, all_reduce_sum
from .model import IMAGE_START, DynamicLlava, GumbelNoise, TrainForward
from .sampling import example_index, gumbel_noise, learning_rate_scale, sample_positions, temperature
from .sharding import full_tensor, shard_trained_parts

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainOptions:
    """Steps, batch, learning rates, what is trained, distillation weights, precision, checkpointing, seed."""

    steps: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    llm_lr: float = 5e-6
    train_projector: bool = False
    train_llm: bool = False
    distill_kl: float = 0.0
    distill_prumerge: float = 0.0
    save_every: int = 50
    warmup: float = 0.03
    seed: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    stop_after: int | None = None

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.grad_accum, self.save_every) < 1:
            raise PrumergeError("--steps, --batch-size, --grad-accum and --save-every must be positive")
        if self.precision not in PRECISIONS:
            raise PrumergeError(f"--precision takes {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.stop_after is not None and self.stop_after < 1:
            raise PrumergeError("--stop-after must be positive")

    def settings(self) -> dict[str, Any]:
        """What a resume must not change (how often to save or when to stop may change)."""
        record = asdict(self)
        for key in ("save_every", "stop_after", "gradient_checkpointing"):
            del record[key]
        return record


@dataclass
class StepLog:
    """What one step reports (over the whole global batch)."""

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


class Trainer:
    """Runs the optimisation; `run` returns the per-step log (including steps restored from a checkpoint)."""

    def __init__(self, dynamic: DynamicLlava, encoder: ReducedVisionEncoder, examples: list[Example],
                 options: TrainOptions, rank: Rank, checkpoint_dir: Path, settings: dict[str, Any] | None = None,
                 resume: bool = False):  # fmt: skip
        """Set up the run; with `resume`, from the checkpoint in `checkpoint_dir` (`start` is its step)."""
        self.dynamic = dynamic
        self.encoder = encoder
        self.examples = examples
        self.options = options
        self.rank = rank
        self.checkpoint_dir = checkpoint_dir
        self.settings = {**(settings or {}), **options.settings(), "world": rank.world}
        self.prumerge = build_reducer("prumerge") if options.distill_prumerge > 0 else None
        if self.prumerge is not None and not dynamic.vision:
            raise PrumergeError("--distill-prumerge needs the vision predictor (vision source 'predictor')")
        if options.precision == "fp16" and rank.device.type != "cuda":
            raise PrumergeError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        self.history: list[StepLog] = []
        self.start = 0
        self.stock_attention = dynamic.decoder.config._attn_implementation
        state = None
        if resume:  # weights go in before sharding, as whole tensors
            weights, state = load_checkpoint(checkpoint_dir, self.settings)
            load_trainable_state(dynamic, weights)
        mark_trainable(dynamic, options)
        if options.gradient_checkpointing:
            dynamic.lm.model.gradient_checkpointing_enable({"use_reentrant": False})
        self.sharded = []
        if rank.world > 1 and options.train_llm:
            self.sharded = shard_trained_parts(dynamic, options.train_projector, PRECISIONS[options.precision])
        groups = trainable_parameters(dynamic)
        self.params = groups["predictors"] + groups["model"]
        param_groups = [{"params": groups["predictors"], "lr": options.lr, "base": options.lr}]
        if groups["model"]:
            param_groups.append({"params": groups["model"], "lr": options.llm_lr, "base": options.llm_lr})
        self.optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
        self.scaler = torch.amp.GradScaler(rank.device.type, enabled=options.precision == "fp16")
        self.trainee = Trainee(dynamic)
        self.module: nn.Module = self.trainee
        if rank.world > 1 and not self.sharded:
            frozen = [n for n, p in self.trainee.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in self.trainee.named_buffers()]  # every rank loaded the same checkpoint
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.trainee, frozen)
            self.module = DistributedDataParallel(self.trainee, find_unused_parameters=True)
        if state is not None:
            self.restore(state)

    def picked(self, step: int, micro: int, rank: Rank | None = None) -> list[tuple[int, Example]]:
        """(place in the run, example) of a rank's share (this rank's by default) of a micro-batch."""
        opt = self.options
        positions = sample_positions(step, micro, opt.batch_size, opt.grad_accum, rank or self.rank)
        return [(p, self.examples[example_index(p, len(self.examples), opt.seed)]) for p in positions]

    def global_counts(self, step: int) -> tuple[int, int]:
        """(labelled tokens, samples) of the whole global step, the denominators of every loss term."""
        samples = [e for m in range(self.options.grad_accum) for r in range(self.rank.world)
                   for _, e in self.picked(step, m, Rank(r, self.rank.world, self.rank.device))]  # fmt: skip
        return sum(sum(e.targets) for e in samples), len(samples)

    def inputs(self, step: int, micro: int) -> MicroBatch:
        """Spliced batch, image lengths, final-answer mask, Gumbel noise and the PruMerge target mask."""
        picked = self.picked(step, micro)
        examples = [e for _, e in picked]
        pixels = preprocess(self.encoder.processor, [open_image(e.image) for e in examples]).to(self.rank.device)
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
        dtype = PRECISIONS[opt.precision]
        with torch.autocast(self.rank.device.type, dtype=dtype, enabled=dtype is not None):
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

    @contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on accumulating micro-batches."""
        for module in self.sharded:
            module.set_requires_gradient_sync(enabled)
        if enabled or not isinstance(self.module, DistributedDataParallel):
            with nullcontext():
                yield
        else:
            with self.module.no_sync():
                yield

    def train_step(self, step: int) -> StepLog:
        """One optimizer step over `grad_accum` micro-batches."""
        opt = self.options
        scale = learning_rate_scale(step, opt.steps, opt.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base"] * scale
        tokens, samples = self.global_counts(step)
        tokens = max(tokens, 1)
        self.optimizer.zero_grad(set_to_none=True)
        stats = torch.zeros(6, dtype=torch.float64)
        for micro in range(opt.grad_accum):
            with self.gradient_sync(micro == opt.grad_accum - 1):
                loss, part = self.micro_loss(step, micro, tokens, samples)
                self.scaler.scale(loss).backward()
            stats += part.double().cpu()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss, ce, image_sum, image_rows, output_sum, output_rows = all_reduce_sum(stats, self.rank).tolist()
        return StepLog(step, loss, ce / tokens, image_sum / image_rows if image_rows else 1.0,
                       output_sum / output_rows if output_rows else 1.0, int(output_rows))  # fmt: skip

    def run(self, on_step: Callable[[StepLog], None] | None = None) -> list[StepLog]:
        """Train from `self.start` to the last step (or `stop_after` steps), checkpointing every `save_every`
        steps and when stopping early."""
        opt = self.options
        self.dynamic.predictors.train()
        self.dynamic.lm.model.train(opt.train_llm)
        if opt.gradient_checkpointing:  # transformers checkpoints a layer only in training mode (no dropout here)
            self.dynamic.decoder.layers.train()
        last = opt.steps if opt.stop_after is None else min(opt.steps, self.start + opt.stop_after)
        for step in range(self.start, last):
            # the layers' attention stays ours through backward, where gradient checkpointing recomputes them
            with dynamic_attention_on(self.dynamic.decoder.config):
                log = self.train_step(step)
            self.history.append(log)
            if ((step + 1) % opt.save_every == 0 and step + 1 < opt.steps) or step + 1 == last < opt.steps:
                self.save_checkpoint(step + 1)
            if on_step is not None:
                on_step(log)
        self.dynamic.predictors.eval()
        self.dynamic.lm.model.eval()
        return self.history

    @property
    def finished(self) -> bool:
        """Whether every step has run."""
        return len(self.history) == self.options.steps

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

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state; under FSDP whole tensors keyed by parameter name (on process 0 only)."""
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.trainee, self.optimizer, options=options)

    def save_checkpoint(self, next_step: int) -> None:
        """Weights (safetensors) and optimizer / scaler / RNG / step / log / settings."""
        rng = self.rng_states()
        weights, optimizer = trainable_state(self.dynamic, self.options), self.optimizer_state()
        if not self.rank.main:
            return
        state = {
            "next_step": next_step,
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "history": [vars(h) for h in self.history],
            "settings": self.settings,
        }
        save_checkpoint(self.checkpoint_dir, weights, state)

    def restore(self, state: dict[str, Any]) -> None:
        """Optimizer, scaler, RNG, log and step of a checkpoint whose weights are loaded."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.trainee, self.optimizer, state["optimizer"], options=options)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][self.rank.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.rank.device)
        self.history = [StepLog(**h) for h in state["history"]]
        self.start = int(state["next_step"])
