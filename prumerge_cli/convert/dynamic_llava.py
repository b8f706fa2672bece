"""`prumerge convert --from dynamic-llava`: an official Dynamic-LLaVA checkpoint (original-LLaVA layout plus
`model.image_score_predictor.*` and `model.output_text_score_predictor.*`, `sparse_config` in config.json) to
a Hugging Face LLaVA directory (`OUT/model`) and a dynamic bundle (`OUT/bundle`) that uses it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .. import atomic
from ..dynamic.bundle import write_dynamic_bundle
from ..dynamic.config import SparseConfig
from ..errors import PrumergeError
from ..models.loading import read_config
from ..models.weights import read_tensors, weight_files
from .llava_original import build_hf_llava, point_bundle_at, save_hf_llava

BLOCK_PARTS = {"norm1": "norm1", "attn.qkv": "qkv", "attn.proj": "proj", "norm2": "norm2", "mlp.fc1": "mlp.0",
               "mlp.fc2": "mlp.2"}  # fmt: skip
TRAINED = ["predictors", "projector", "llm"]
"""What the official recipe trains (the projector too, at 5e-6; see the spec, section 2)."""


def predictor_name(key: str) -> str | None:
    """Our predictor name of an official predictor weight (None: not a predictor weight)."""
    vision = "model.image_score_predictor."
    text = "model.output_text_score_predictor."
    if key.startswith(text) and (match := re.fullmatch(r"output_mlp\.(\d+)\.(.+)", key.removeprefix(text))):
        return f"predictors.text.mlp.{match[1]}.{match[2]}"
    if not key.startswith(vision):
        return None
    rest = key.removeprefix(vision)
    if match := re.fullmatch(r"down_mlp\.(\d+)\.(.+)", rest):
        return f"predictors.vision.down.{match[1]}.{match[2]}"
    if match := re.fullmatch(r"output_mlp\.(\d+)\.(.+)", rest):
        return f"predictors.vision.head.{match[1]}.{match[2]}"
    if match := re.fullmatch(r"transformer\.(\d+)\.(.+)\.(weight|bias)", rest):
        part = BLOCK_PARTS.get(match[2])
        return None if part is None else f"predictors.vision.blocks.{match[1]}.{part}.{match[3]}"
    return None


def sparse_config(source: Path, predictors: dict[str, torch.Tensor]) -> SparseConfig:
    """Our `SparseConfig` from the official `sparse_config` (the text MLP widths from its weights)."""
    official = read_config(source).get("sparse_config")
    if not isinstance(official, dict):
        raise PrumergeError(f"{source}/config.json has no sparse_config: not a Dynamic-LLaVA checkpoint")
    for switch in ("use_vision_predictor", "use_output_text_predictor"):
        if official.get(switch) is False:
            raise PrumergeError(f"the checkpoint was trained with {switch}=False; only both predictors convert")
    widths = tuple(int(predictors[f"predictors.text.mlp.{i}.weight"].shape[0]) for i in (1, 3, 5))
    return SparseConfig(
        sparse_layer=int(official.get("sparse_layer", 2)),
        d_model=int(official.get("d_model", 512)),
        nhead=int(official.get("nhead", 8)),
        dim_feedforward=int(official.get("dim_feedforward", 2048)),
        num_layers=int(official.get("num_layers", 2)),
        text_hidden=widths,
        vision_keep_rate=float(official.get("vision_keep_rate", 0.2)),
        output_keep_rate=float(official.get("output_text_keep_rate", 0.5)),
        output_len_for_training=int(official.get("output_text_len_for_training", 50)),
        mask_loss_weight=float(official.get("mask_loss_weight", 100.0)),
    )


def convert_dynamic_llava(source: Path, vision_tower: Path, output: Path, force: bool = False) -> Path:
    """Write `output/model` and `output/bundle` atomically; returns the bundle directory."""
    predictors = read_tensors(weight_files(source), predictor_name)
    if not predictors:
        raise PrumergeError(f"{source} has no model.image_score_predictor.* weights: not a Dynamic-LLaVA checkpoint")
    config = sparse_config(source, predictors)
    model, tokenizer = build_hf_llava(source, vision_tower)
    with atomic.atomic_dir(output, force=force) as tmp:
        save_hf_llava(model, tokenizer, vision_tower, tmp / "model")
        write_dynamic_bundle(tmp / "bundle", tmp / "model", config, "predictor", predictors, TRAINED, [], False)
        point_bundle_at(tmp / "bundle", Path(output) / "model", "dynamic-llava", source)
    return Path(output) / "bundle"
