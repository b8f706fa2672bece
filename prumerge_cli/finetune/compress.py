"""`prumerge compress LLAVA_DIR --method M --finetune`: LoRA fine-tuning with the reducer active, then a bundle."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..encoder import ReducedVisionEncoder
from ..errors import PrumergeError
from ..lm.llava_lm import LlavaLm
from ..lm.positions import DEFAULT_POSITIONS
from ..models.weights import hash_files
from ..training.checkpoints import file_digest
from ..training.conversations import Dataset, load_examples, resolve_template
from ..training.distributed import barrier, init_rank, shutdown
from ..training.loop import PRECISIONS, StepLog, TrainOptions
from ..training.progress import train_with_progress
from .bundle import write_finetuned_bundle
from .lora import LoraSettings, attach_lora, hold_frozen_lm_in
from .training import FinetuneTrainer


@dataclass(frozen=True)
class FinetuneJob:
    """Everything `compress --finetune` needs."""

    model_dir: Path
    method: str
    data: Path
    images: Path
    output: Path
    options: TrainOptions
    lora: LoraSettings = field(default_factory=LoraSettings)
    params: dict[str, Any] = field(default_factory=dict)
    template: str = "auto"
    skip_missing_images: bool = False
    resume: bool = False
    force: bool = False
    device_type: str = "cpu"
    checkpoints: Path | None = None
    positions: str = DEFAULT_POSITIONS

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints live until the bundle is written: `checkpoints`, else beside the output."""
        return self.checkpoints or self.output.parent / f".{self.output.name}.checkpoint"

    def recipe(self, data: Dataset, model_sha256: str) -> dict[str, Any]:
        """What the bundle records of the run, and what a resume must not change (the base model's weights
        among them: `model_sha256`)."""
        opt = self.options
        return {"model": model_sha256, "lora": self.lora.to_dict(), "steps": opt.steps, "batch_size": opt.batch_size,
                "grad_accum": opt.grad_accum, "lr": opt.lr, "projector_lr": opt.projector_lr,
                "precision": opt.precision, "template": self.template, "positions": self.positions,
                "data": file_digest(self.data), "examples": len(data.examples), "text_only": data.text_only,
                "method": self.method, "params": self.params, "seed": opt.seed}  # fmt: skip


def run_finetune(job: FinetuneJob, console: Console, on_step=None) -> list[StepLog]:
    """Fine-tune (or resume) and write the bundle; `on_step(log)` is called after every step."""
    if job.output.exists() and not job.force:
        raise PrumergeError(f"{job.output} exists; pass --force to replace it")
    rank = init_rank(job.device_type)
    try:
        torch.manual_seed(job.options.seed)
        lm = LlavaLm.from_pretrained(job.model_dir)
        job = replace(job, template=resolve_template(job.template, lm.tokenizer))
        encoder = ReducedVisionEncoder.from_pretrained(job.model_dir, job.method, positions=job.positions,
                                                       **job.params)  # fmt: skip
        data = load_examples(job.data, job.images, lm.tokenizer, job.template, job.skip_missing_images,
                             keep_text_only=True)  # fmt: skip
        peft_model = attach_lora(lm.model, job.lora)
        if PRECISIONS[job.options.precision] is not None:  # the frozen base in the compute dtype, as upstream's bf16
            hold_frozen_lm_in(lm.model, PRECISIONS[job.options.precision])
        lm.model.to(rank.device)
        encoder.to(rank.device)
        encoder.projector = lm.model.model.multi_modal_projector
        recipe = job.recipe(data, hash_files(encoder.model.weight_files))
        trainer = FinetuneTrainer(lm, peft_model, encoder, data.examples, job.options, rank, job.checkpoint_dir,
                                  recipe, job.resume)  # fmt: skip
        if rank.main:
            where = f"{rank.world} processes, DDP; " if rank.world > 1 else ""
            console.print(f"{where}{len(data.examples)} conversations ({data.text_only} text only), {job.method} "
                          f"active, LoRA r {job.lora.rank}")  # fmt: skip
            if job.resume:
                console.print(f"resumed from {job.checkpoint_dir} at step {trainer.start}")
        history = train_with_progress(trainer, "fine-tune", "loss {task.fields[loss]:.3f}",
                                      lambda log: {"loss": log.loss}, console, job.checkpoint_dir, on_step)  # fmt: skip
        if trainer.finished and rank.main:
            write_finetuned_bundle(job.output, encoder, peft_model, encoder.projector, recipe,
                                   [asdict(h) for h in history], job.force)  # fmt: skip
            shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
        barrier(rank)
        return history
    finally:
        shutdown(rank)
