"""The optimisation loop every training run shares: AdamW with warm-up and cosine decay, mixed precision,
gradient accumulation, DDP or FSDP under `torchrun`, checkpoints with exact resume, and `--stop-after`.

Every loss term is normalised by its count over the whole global step (all processes, all accumulated
micro-batches), and what a sample sees depends on its place in the run only (`sampling`), so N processes,
one process accumulating N micro-batches and one process with an N times larger batch train the same weights.
A subclass says what is trained and what the loss is."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import PrumergeError
from .checkpoints import load_checkpoint, save_checkpoint
from .conversations import Example
from .distributed import Rank, all_reduce_sum
from .sampling import example_index, learning_rate_scale, sample_positions

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainOptions:
    """Steps, batch, learning rates, what is trained, distillation weights, precision, checkpointing, seed."""

    steps: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    llm_lr: float = 5e-6
    projector_lr: float = 2e-5
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
    """What one step reports over the whole global batch: the loss, its cross-entropy part and the run's own
    figures (e.g. keep ratios)."""

    step: int
    loss: float
    ce: float
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer:
    """The loop; a subclass provides the trainable parts (`prepare`, `parameter_groups`, `trainee`, `shard`,
    `state`, `load_state`, `train_mode`) and the loss (`micro_loss`, `step_log`). `run` returns the per-step
    log, including steps restored from a checkpoint."""

    STATS = 2
    """Length of the statistics vector `micro_loss` returns: [loss, ce sum, ...]."""

    def __init__(self, examples: list[Example], options: TrainOptions, rank: Rank, checkpoint_dir: Path,
                 settings: dict[str, Any] | None = None, resume: bool = False):  # fmt: skip
        """Set up the run; with `resume`, from the checkpoint in `checkpoint_dir` (`start` is its step)."""
        self.examples = examples
        self.options = options
        self.rank = rank
        self.checkpoint_dir = checkpoint_dir
        self.settings = {**(settings or {}), **options.settings(), "world": rank.world}
        if options.precision == "fp16" and rank.device.type != "cuda":
            raise PrumergeError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        self.history: list[StepLog] = []
        self.start = 0
        state = None
        if resume:  # weights go in before sharding, as whole tensors
            weights, state = load_checkpoint(checkpoint_dir, self.settings)
            self.load_state(weights)
        self.prepare()
        self.sharded = self.shard(PRECISIONS[options.precision]) if rank.world > 1 and options.train_llm else []
        groups = [(params, lr) for params, lr in self.parameter_groups() if params]
        self.params = [p for params, _ in groups for p in params]
        self.optimizer = torch.optim.AdamW([{"params": params, "lr": lr, "base": lr} for params, lr in groups],
                                           weight_decay=0.0)  # fmt: skip
        self.scaler = torch.amp.GradScaler(rank.device.type, enabled=options.precision == "fp16")
        self.trainee = self.make_trainee()
        self.module: nn.Module = self.trainee
        if rank.world > 1 and not self.sharded:
            frozen = [n for n, p in self.trainee.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in self.trainee.named_buffers()]  # every rank loaded the same checkpoint
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.trainee, frozen)
            self.module = DistributedDataParallel(self.trainee, find_unused_parameters=True)
        if state is not None:
            self.restore(state)

    # what a subclass provides
    def prepare(self) -> None:
        """Set requires_grad on the trained parts (and gradient checkpointing if asked)."""
        raise NotImplementedError

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The trained parameters by learning rate."""
        raise NotImplementedError

    def make_trainee(self) -> nn.Module:
        """The module whose forward the loss calls (what DDP wraps)."""
        raise NotImplementedError

    def shard(self, dtype: torch.dtype | None) -> list[nn.Module]:
        """Shard the trained parts over the processes (FSDP); the sharded modules."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, whole (every process calls this under FSDP)."""
        raise NotImplementedError

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `state`."""
        raise NotImplementedError

    def train_mode(self, on: bool) -> None:
        """Put the trained parts in training (or evaluation) mode."""
        raise NotImplementedError

    def micro_loss(self, step: int, micro: int, tokens: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's part of the global loss for one micro-batch (times the process count, since DDP and FSDP
        average), and its `STATS` statistics for the log."""
        raise NotImplementedError

    def step_log(self, step: int, stats: list[float], tokens: int) -> StepLog:
        """The log entry from the statistics summed over micro-batches and processes."""
        return StepLog(step, stats[0], stats[1] / tokens)

    @contextmanager
    def step_context(self) -> Iterator[None]:
        """Held around each step, backward included."""
        yield

    # the loop
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

    def autocast(self):
        """Autocast to the run's precision (nothing in fp32)."""
        dtype = PRECISIONS[self.options.precision]
        return torch.autocast(self.rank.device.type, dtype=dtype, enabled=dtype is not None)

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
        stats = torch.zeros(self.STATS, dtype=torch.float64)
        for micro in range(opt.grad_accum):
            with self.gradient_sync(micro == opt.grad_accum - 1):
                loss, part = self.micro_loss(step, micro, tokens, samples)
                self.scaler.scale(loss).backward()
            stats += part.double().cpu()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.step_log(step, all_reduce_sum(stats, self.rank).tolist(), tokens)

    def run(self, on_step: Callable[[StepLog], None] | None = None) -> list[StepLog]:
        """Train from `self.start` to the last step (or `stop_after` steps), checkpointing every `save_every`
        steps and when stopping early."""
        opt = self.options
        self.train_mode(True)
        last = opt.steps if opt.stop_after is None else min(opt.steps, self.start + opt.stop_after)
        for step in range(self.start, last):
            with self.step_context():
                log = self.train_step(step)
            self.history.append(log)
            if ((step + 1) % opt.save_every == 0 and step + 1 < opt.steps) or step + 1 == last < opt.steps:
                self.save_checkpoint(step + 1)
            if on_step is not None:
                on_step(log)
        self.train_mode(False)
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
        weights, optimizer = self.state(), self.optimizer_state()
        if not self.rank.main:
            return
        state = {
            "next_step": next_step,
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "history": [asdict(h) for h in self.history],
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
