"""`prumerge compress`: configure a reducer on a model and write a bundle."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from .. import atomic, devices, dtypes
from ..errors import PrumergeError
from ..families.layout import DEFAULT_SCOPE, SCOPE_HELP, check_scope
from ..finetune.lora import LINEAR_LAYERS, LoraSettings
from ..lm.positions import DEFAULT_POSITIONS, POSITIONS_HELP, check_positions
from ..progress import Phases
from ..reducers import REDUCERS
from ..training.loop import TrainOptions
from . import app
from .console import out_console
from .options import PARAM_HELP, parse_params

if TYPE_CHECKING:  # the training and model modules load transformers: imported where a command needs them
    from ..dynamic.compress import DynamicJob
    from ..dynamic.config import SparseConfig
    from ..finetune.compress import FinetuneJob


LORA_TARGETS_HELP = f"Comma-separated LM linears (default: all, {', '.join(LINEAR_LAYERS)})."


def DYN(**kwargs: object) -> typer.models.OptionInfo:
    """An option of the Dynamic-LLaVA help panel."""
    return typer.Option(rich_help_panel="Dynamic-LLaVA (--method dynamic)", **kwargs)


def TRAIN(**kwargs: object) -> typer.models.OptionInfo:
    """An option of every training run (--method dynamic, --finetune)."""
    return typer.Option(rich_help_panel="Training (--method dynamic, --finetune)", **kwargs)


def TUNE(**kwargs: object) -> typer.models.OptionInfo:
    """An option of the fine-tuning help panel."""
    return typer.Option(rich_help_panel="Fine-tuning with the reducer active (--finetune)", **kwargs)


@app.command()
def compress(
    model_dir: Annotated[
        Path,
        typer.Argument(help="Checkpoint directory: CLIP, SigLIP, LLaVA, NeXT, OneVision, InternVL, Gemma 3."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle directory to write.")],
    method: Annotated[str, typer.Option("--method", "-m", help=f"{', '.join(REDUCERS)} or dynamic.")] = "prumerge",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help=PARAM_HELP)] = None,
    dtype: Annotated[str, typer.Option(help=f"Tower dtype: {dtypes.HELP}.")] = "fp32",
    score_layer: Annotated[int | None, typer.Option(help="Layer whose q/k give scores and keys.")] = None,
    score_dtype: Annotated[str, typer.Option(help="'model' (official) or 'fp32'.")] = "model",
    positions: Annotated[str, typer.Option(help=POSITIONS_HELP)] = DEFAULT_POSITIONS,
    scope: Annotated[str, typer.Option(help=SCOPE_HELP + ".")] = DEFAULT_SCOPE,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
    device: Annotated[str, typer.Option(help=f"{devices.HELP} (torchrun: one GPU a process).")] = "cpu",
    data: Annotated[Path | None, TRAIN(help="LLaVA conversation JSON.")] = None,
    images: Annotated[Path | None, TRAIN(help="Folder the image paths start from.")] = None,
    vision_keep: Annotated[float, DYN(min=0.0, max=1.0, help="Image keep rate, 0-1.")] = 0.2,
    output_keep: Annotated[float, DYN(min=0.0, max=1.0, help="Output keep rate, 0-1.")] = 0.5,
    output_min_len: Annotated[int, DYN(min=0, help="Shorter answers keep every token.")] = 50,
    vision_source: Annotated[str, DYN(help="predictor, prumerge or prumerge+.")] = "predictor",
    sparse_layer: Annotated[int, DYN(help="Decoder layer feeding the predictors.")] = 2,
    predictor_width: Annotated[int, DYN(help="Vision predictor width.")] = 512,
    predictor_heads: Annotated[int, DYN(help="Vision predictor heads.")] = 8,
    predictor_blocks: Annotated[int, DYN(help="Vision predictor blocks.")] = 2,
    text_predictor_width: Annotated[int, DYN(help="Output predictor: W, W/2, W/4.")] = 512,
    steps: Annotated[int, TRAIN(min=1, help="Optimisation steps.")] = 300,
    batch_size: Annotated[int, TRAIN(min=1, help="Conversations a step (a process).")] = 8,
    lr: Annotated[float, TRAIN(help="Predictors' or LoRA's learning rate.")] = 2e-4,
    llm_lr: Annotated[float, DYN(min=0.0, help="LM and projector learning rate.")] = 5e-6,
    train_projector: Annotated[bool, DYN(help="Train the projector too.")] = False,
    train_llm: Annotated[bool, DYN(help="Train the LM too.")] = False,
    official: Annotated[bool, DYN(help="Train LM and projector too (official).")] = False,
    mask_loss_weight: Annotated[float, DYN(min=0.0, help="λ, weight of the keep-rate losses.")] = 100.0,
    grad_accum: Annotated[int, TRAIN(min=1, help="Micro-batches a step.")] = 1,
    precision: Annotated[str, TRAIN(help="fp32, or bf16/fp16 autocast (fp16: GPU).")] = "fp32",
    gradient_checkpointing: Annotated[bool, TRAIN(help="Recompute LM activations in backward.")] = False,
    template: Annotated[str, TRAIN(help="plain, vicuna_v1 or auto (chat template).")] = "auto",
    skip_missing_images: Annotated[bool, TRAIN(help="Leave out records without a readable image.")] = False,
    plan: Annotated[bool, DYN(help="Print memory per GPU and fit; no training.")] = False,
    gpus: Annotated[int | None, DYN(help="GPUs planned (default: WORLD_SIZE or 1).")] = None,
    gpu_memory: Annotated[float | None, DYN(help="GiB per GPU (default: the visible GPU's).")] = None,
    seq_len: Annotated[int, DYN(help="Longest sequence --plan assumes.")] = 2048,
    stop_after: Annotated[int | None, TRAIN(help="Checkpoint and stop after N steps.")] = None,
    distill_kl: Annotated[float, DYN(min=0.0, help="Weight of KL to the full model's logits.")] = 0.0,
    distill_prumerge: Annotated[float, DYN(min=0.0, help="Weight of BCE to PruMerge's kept patches.")] = 0.0,
    save_every: Annotated[int, TRAIN(min=1, help="Checkpoint every N steps.")] = 50,
    resume: Annotated[bool, TRAIN(help="Go on from this output's checkpoint.")] = False,
    restart: Annotated[bool, TRAIN(help="Drop this output's checkpoint, start anew.")] = False,
    seed: Annotated[int, TRAIN(help="Seed: init, data order, Gumbel noise.")] = 0,
    finetune: Annotated[bool, TUNE(help="LoRA-tune LM and projector, --method active.")] = False,
    lora_rank: Annotated[int, TUNE(min=1, help="LoRA rank.")] = 128,
    lora_alpha: Annotated[float, TUNE(help="LoRA alpha.")] = 256.0,
    lora_dropout: Annotated[float, TUNE(min=0.0, max=0.99, help="LoRA dropout.")] = 0.05,
    lora_targets: Annotated[str, TUNE(show_default=False, help=LORA_TARGETS_HELP)] = ",".join(LINEAR_LAYERS),
    projector_lr: Annotated[float, TUNE(min=0.0, help="Projector learning rate.")] = 2e-5,
    merge_lora: Annotated[bool, TUNE(help="MODEL_DIR is a fine-tuned bundle: write its merged LLaVA.")] = False,
) -> None:
    """Configure a reducer on a model, check it runs, and write a bundle (reducer.json).

    With [bold]--method dynamic[/bold], train Dynamic-LLaVA predictors on a LLaVA instead;
    with [bold]--finetune[/bold], LoRA-tune its LM with the reducer active. Both train
    data-parallel under `torchrun --nproc-per-node N $(which prumerge) compress`."""
    atomic.check_output(output, force)
    check_positions(positions)
    check_scope(scope)
    check_training_values(lr, lora_alpha)
    where = devices.resolve_device(device)
    if merge_lora and (finetune or method == "dynamic"):
        raise PrumergeError("--merge-lora merges a fine-tuned bundle's adapters; it trains nothing, so it takes "
                            "neither --finetune nor --method dynamic")  # fmt: skip
    if merge_lora:
        from ..finetune.bundle import merge_lora as merge

        with Phases(out_console()) as phases, phases.phase(f"merging {model_dir} into its model"):
            merge(model_dir, output, force)
        out_console().print(f"wrote {output}: a LlavaForConditionalGeneration with the adapters and projector merged")
        return
    from ..families.model import is_family_checkpoint

    if not merge_lora and is_family_checkpoint(model_dir):
        if finetune or method == "dynamic":
            raise PrumergeError(f"{model_dir} is a tiled or pooled family: --finetune and --method dynamic take "
                                "LLaVA-1.5-shaped checkpoints only (their training path has no tiles)")  # fmt: skip
        if score_layer is not None or score_dtype != "model":
            raise PrumergeError("--score-layer and --score-dtype apply to LLaVA-1.5-shaped towers; a family's score "
                                "layer is the one after its feature layer, in float32")  # fmt: skip
        compress_family(model_dir, output, method, parse_params(param), dtypes.canonical(dtype), positions, scope,
                        force)  # fmt: skip
        return
    if finetune:
        from ..finetune.compress import FinetuneJob

        if method not in REDUCERS:
            raise PrumergeError(f"--finetune takes a training-free method ({', '.join(REDUCERS)}); got {method!r}")
        if data is None or images is None:
            raise typer.BadParameter("--finetune needs --data and --images", param_hint="--data")
        options = TrainOptions(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                               projector_lr=projector_lr, save_every=save_every, seed=seed,
                               precision=dtypes.canonical(precision), stop_after=stop_after,
                               gradient_checkpointing=gradient_checkpointing)  # fmt: skip
        lora = LoraSettings(lora_rank, lora_alpha, lora_dropout, tuple(t.strip() for t in lora_targets.split(",")))
        run_training(FinetuneJob(model_dir, method, data, images, output, options, lora, parse_params(param),
                                 template, skip_missing_images, resume, force, where.type,
                                 positions=positions), restart)  # fmt: skip
        return
    if method == "dynamic":
        from ..dynamic.compress import DynamicJob
        from ..dynamic.config import SparseConfig

        if (data is None or images is None) and not plan:
            raise typer.BadParameter("--method dynamic needs --data and --images", param_hint="--data")
        config = SparseConfig(sparse_layer=sparse_layer, d_model=predictor_width, nhead=predictor_heads,
                              dim_feedforward=4 * predictor_width, num_layers=predictor_blocks,
                              text_hidden=(text_predictor_width, text_predictor_width // 2, text_predictor_width // 4),
                              vision_keep_rate=vision_keep, output_keep_rate=output_keep,
                              output_len_for_training=output_min_len, mask_loss_weight=mask_loss_weight)  # fmt: skip
        options = TrainOptions(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, llm_lr=llm_lr,
                               train_projector=train_projector or official, train_llm=train_llm or official,
                               distill_kl=distill_kl, distill_prumerge=distill_prumerge, save_every=save_every,
                               seed=seed, precision=dtypes.canonical(precision), stop_after=stop_after,
                               gradient_checkpointing=gradient_checkpointing)  # fmt: skip
        if plan:
            show_plan(model_dir, config, options, seq_len, gpus, gpu_memory, where.type)
            return
        job = DynamicJob(model_dir, data, images, output, config, options, vision_source, template,
                         skip_missing_images, resume, force, where.type, positions)  # fmt: skip
        run_training(job, restart)
        return
    if score_dtype != "model" and dtypes.ALIASES.get(score_dtype, score_dtype) != "fp32":
        raise PrumergeError(f"--score-dtype takes 'model' or 'fp32', got {score_dtype!r}")
    score_dtype = "model" if score_dtype == "model" else "float32"
    dtype = dtypes.canonical(dtype)
    from ..encoder import ReducedVisionEncoder

    console = out_console()
    with Phases(console) as phases, phases.phase(f"loading {model_dir} and checking {method}"):
        encoder = ReducedVisionEncoder.from_pretrained(
            model_dir,
            method,
            dtype=dtype,
            score_layer=score_layer,
            score_dtype=score_dtype,
            positions=positions,
            **parse_params(param),
        )
        encoder.to(where)
        side = encoder.tower.vision.config.image_size
        probe = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
        encoder(probe)
        encoder.save(output, force=force)
    table = bundle_table(output, f"{encoder.model_dir} ({encoder.model.model_type})", encoder)
    n = encoder.tower.num_patches
    extra = int(getattr(encoder.reducer, "merge", False))
    kept = encoder.reducer.max_tokens(n) - extra
    table.add_row(
        "visual tokens", f"at most {kept} of {n} patches" + (", plus the merged extra token" if extra else "")
    )
    console.print(table)


def bundle_table(output: Path, model: str, encoder: Any) -> Table:
    """The written bundle's model, method, parameters and positions, for more rows to follow."""
    table = Table(title=f"bundle {output}", show_header=False)
    table.add_row("model", model)
    table.add_row("method", getattr(encoder, "method_label", encoder.reducer.name))
    table.add_row("parameters", ", ".join(f"{k}={v}" for k, v in encoder.reducer.params().items()) or "-")
    table.add_row("positions", encoder.positions)
    return table


def compress_family(model_dir: Path, output: Path, method: str, params: dict, dtype: str, positions: str, scope: str,
                    force: bool) -> None:  # fmt: skip
    """Configure `method` on a family checkpoint, run it on a probe image of two tiles, and write the bundle."""
    from PIL import Image

    from ..families.model import FamilyEncoder

    console = out_console()
    with Phases(console) as phases, phases.phase(f"loading {model_dir} and checking {method}"):
        encoder = FamilyEncoder.from_pretrained(model_dir, method, dtype=dtype, scope=scope, positions=positions,
                                                **params)  # fmt: skip
        probe = Image.fromarray(torch.randint(0, 256, (300, 600, 3), dtype=torch.uint8,
                                              generator=torch.Generator().manual_seed(0)).numpy())  # fmt: skip
        image = encoder.encode_images([probe])[0]
        encoder.save(output, force=force)
    table = bundle_table(output, f"{encoder.model_dir} ({encoder.family})", encoder)
    table.add_row("scope", encoder.scope)
    table.add_row("probe 600x300", f"{len(image.tokens)} of {image.span} tokens to the LM (kept per tile "
                                   f"{', '.join(map(str, image.kept_per_tile))})")  # fmt: skip
    console.print(table)


def check_training_values(lr: float, lora_alpha: float) -> None:
    """Refuse, before any work, the training values no option range catches: rates and sizes that must be
    positive."""
    for name, value in (("--lr", lr), ("--lora-alpha", lora_alpha)):
        if not value > 0:
            raise PrumergeError(f"{name} must be positive, got {value}")


def show_plan(model_dir: Path, config: SparseConfig, options: TrainOptions, seq_len: int, gpus: int | None,
              gpu_memory_gib: float | None, device_type: str) -> None:  # fmt: skip
    """Print the memory plan of the run; exit 1 when it does not fit."""
    from ..dynamic.bundle import check_llava
    from ..dynamic.plan import gpu_memory, plan_memory

    check_llava(model_dir)
    world = gpus if gpus is not None else int(os.environ.get("WORLD_SIZE", "1"))
    found = plan_memory(model_dir, config, options, seq_len, world, gpu_memory(gpu_memory_gib, device_type))
    out_console().print(f"{model_dir}: batch {options.batch_size} per GPU, sequences of {seq_len} tokens, "
                        f"{options.precision}\n{found.text()}", highlight=False)  # fmt: skip
    if not found.fits:
        raise typer.Exit(1)


def check_checkpoint(directory: Path, resume: bool, restart: bool) -> None:
    """Refuse, before any work, a run that would silently replace an unfinished run's checkpoint in `directory`
    (without --resume or --restart) or resume from none; --restart deletes it."""
    from ..training.checkpoints import saved_step

    if resume and restart:
        raise PrumergeError("use either --resume or --restart")
    step = saved_step(directory)
    if step is None:
        if resume:
            raise PrumergeError(f"--resume: no checkpoint in {directory}")
    elif restart:
        shutil.rmtree(directory, ignore_errors=True)
    elif not resume:
        raise PrumergeError(f"an unfinished run of this output checkpointed at step {step} in {directory}: pass "
                            "--resume to go on from there or --restart to start over")  # fmt: skip


def run_training(job: DynamicJob | FinetuneJob, restart: bool = False) -> None:
    """Run a training job (see `check_checkpoint` for --resume / --restart); Ctrl-C leaves the last checkpoint
    and says how to resume, or that there is none yet."""
    from ..dynamic.compress import DynamicJob, run_dynamic
    from ..finetune.compress import FinetuneJob, run_finetune
    from ..training.checkpoints import saved_step

    check_checkpoint(job.checkpoint_dir, job.resume, restart)
    console = out_console()
    try:
        history = run_dynamic(job, console) if isinstance(job, DynamicJob) else run_finetune(job, console)
    except KeyboardInterrupt:
        step = saved_step(job.checkpoint_dir)
        said = f"interrupted; the checkpoint of step {step} is in {job.checkpoint_dir}: rerun with --resume"
        if step is None:
            said = f"interrupted; no checkpoint yet (one is written every --save-every {job.options.save_every} steps)"
        Console(stderr=True).print(said, highlight=False)
        raise typer.Exit(130) from None
    last = history[-1]
    if len(history) < job.options.steps:
        return
    if isinstance(job, FinetuneJob):
        console.print(f"bundle {job.output}: {len(history)} steps with {job.method} active, loss {last.loss:.3f}")
        return
    if not any(h.metrics["output_rows"] for h in history):
        console.print(f"[yellow]warning:[/yellow] no final answer reached --output-min-len "
                      f"{job.config.output_len_for_training} tokens: the output predictor is untrained")  # fmt: skip
    keep = last.metrics
    console.print(f"bundle {job.output}: {len(history)} steps, loss {last.loss:.3f} (ce {last.ce:.3f}), "
                  f"keep ratios image {keep['image_keep']:.2f} output {keep['output_keep']:.2f}")  # fmt: skip
