"""`prumerge compress --method dynamic`: train the predictors on LLaVA conversation data and write a bundle."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..errors import PrumergeError
from ..lm.positions import DEFAULT_POSITIONS
from ..models.loading import read_config
from ..models.weights import hash_files, weight_files
from ..training.checkpoints import file_digest
from ..training.conversations import Dataset, load_examples, resolve_template
from ..training.distributed import barrier, init_rank, shutdown
from ..training.loop import PRECISIONS, StepLog, TrainOptions
from ..training.progress import train_with_progress
from .bundle import load_llava, vision_encoder, write_dynamic_bundle
from .config import SparseConfig
from .model import DynamicLlava
from .predictors import Predictors
from .training import DynamicTrainer, trainable_state


@dataclass(frozen=True)
class DynamicJob:
    """Everything `compress --method dynamic` needs."""

    model_dir: Path
    data: Path
    images: Path
    output: Path
    config: SparseConfig
    options: TrainOptions
    vision_source: str = "predictor"
    template: str = "auto"
    skip_missing_images: bool = False
    resume: bool = False
    force: bool = False
    device_type: str = "cpu"  # "cuda": one GPU per process (its local rank)
    positions: str = DEFAULT_POSITIONS

    def settings(self, data: Dataset) -> dict[str, Any]:
        """The data, model (its weights' sha256) and method settings a resume must not change (training options
        are added by the trainer)."""
        return {"model": hash_files(weight_files(self.model_dir)), "data": file_digest(self.data),
                "examples": len(data.examples), "template": self.template,
                "vision_source": self.vision_source, "positions": self.positions,
                "sparse_config": self.config.to_dict()}  # fmt: skip

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints live until the bundle is written: beside the output."""
        return self.output.parent / f".{self.output.name}.checkpoint"


KEEP_COLUMNS = (
    "loss {task.fields[loss]:.3f} ce {task.fields[ce]:.3f} keep img {task.fields[img]:.2f} out {task.fields[out]:.2f}"
)


def keep_fields(log: StepLog) -> dict[str, float]:
    """The bar's figures of one step."""
    metrics = log.metrics or {"image_keep": float("nan"), "output_keep": float("nan")}
    return {"loss": log.loss, "ce": log.ce, "img": metrics["image_keep"], "out": metrics["output_keep"]}


def run_dynamic(job: DynamicJob, console: Console, on_step=None) -> list[StepLog]:
    """Train (or resume) and write the bundle; `on_step(log)` is called after every step."""
    if job.output.exists() and not job.force:
        raise PrumergeError(f"{job.output} exists; pass --force to replace it")
    rank = init_rank(job.device_type)
    try:
        torch.manual_seed(job.options.seed)
        model, tokenizer = load_llava(job.model_dir)
        job = replace(job, template=resolve_template(job.template, tokenizer))
        if not job.options.train_llm and job.options.precision != "fp32":  # a frozen LM computes in that dtype anyway
            model.model.language_model.to(PRECISIONS[job.options.precision])
            model.lm_head.to(PRECISIONS[job.options.precision])
        model.to(rank.device)
        data = load_examples(job.data, job.images, tokenizer, job.template, job.skip_missing_images)
        if rank.main:
            report_data(data, console)
        predictors = Predictors(model.config.text_config.hidden_size, job.config, job.options.seed).to(rank.device)
        dynamic = DynamicLlava(model, tokenizer, predictors, vision=job.vision_source == "predictor")
        encoder = vision_encoder(job.model_dir, job.vision_source, model, job.positions).to(rank.device)
        if rank.device.type == "cuda":
            check_fits(job, data, rank.world)
        trainer = DynamicTrainer(dynamic, encoder, data.examples, job.options, rank, job.checkpoint_dir,
                                 job.settings(data), job.resume)  # fmt: skip
        if rank.world > 1 and rank.main:
            how = "FSDP (trained parts sharded)" if trainer.sharded else "DDP (gradients averaged)"
            console.print(f"{rank.world} processes, {how}")
        if job.resume and rank.main:
            console.print(f"resumed from {job.checkpoint_dir} at step {trainer.start}")
        elif job.checkpoint_dir.exists() and rank.main:
            console.print(f"starting over; the checkpoint in {job.checkpoint_dir} will be replaced (see --resume)")
        history = train_with_progress(trainer, "predictors", KEEP_COLUMNS, keep_fields, console, job.checkpoint_dir,
                                      on_step)  # fmt: skip
        if trainer.finished:
            state = trainable_state(dynamic, job.options)  # every process takes part under FSDP
            if rank.main:
                trained = ["predictors", *(["projector"] if job.options.train_projector else []),
                           *(["llm"] if job.options.train_llm else [])]  # fmt: skip
                write_dynamic_bundle(job.output, job.model_dir, job.config, job.vision_source, state, trained,
                                     [asdict(h) for h in history], job.force, job.positions)  # fmt: skip
                remove_checkpoint(job.checkpoint_dir)
        barrier(rank)
        return history
    finally:
        shutdown(rank)


def check_fits(job: DynamicJob, data: Dataset, world: int) -> None:
    """Refuse a GPU run whose memory plan (at the longest sequence of the data) exceeds the GPU."""
    from .plan import gpu_memory, plan_memory

    image_tokens = int(read_config(job.model_dir).get("image_seq_length", 576))
    longest = max(1 + len(e.prefix) + image_tokens + len(e.text) for e in data.examples)
    found = plan_memory(job.model_dir, job.config, job.options, longest, world, gpu_memory(None, "cuda"))
    if not found.fits:
        raise PrumergeError(f"this run needs {found.total / 2**30:.1f} GiB per GPU, more than the "
                            f"{found.gpu_bytes / 2**30:.0f} GiB there is; see --plan")  # fmt: skip


def report_data(data: Dataset, console: Console) -> None:
    """Say once what was left out of the data."""
    if data.text_only:
        console.print(f"{data.text_only} text-only records skipped (Dynamic-LLaVA trains on image records, as the "
                      f"official recipe does)")  # fmt: skip
    if data.missing_images:
        console.print(f"[yellow]warning:[/yellow] {data.missing_images} records skipped: their image is missing or "
                      f"unreadable")  # fmt: skip


def remove_checkpoint(checkpoint_dir: Path) -> None:
    """Delete a finished run's checkpoint directory."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
