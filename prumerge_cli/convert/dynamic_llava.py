"""`prumerge convert --from dynamic-llava`: an official Dynamic-LLaVA checkpoint (original-LLaVA layout plus
`model.image_score_predictor.*` and `model.output_text_score_predictor.*`, `sparse_config` in config.json) to
a Hugging Face LLaVA directory (`OUT/model`) and a dynamic bundle (`OUT/bundle`) that uses it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from .. import atomic
from ..bundle import BUNDLE_FILE
from ..dynamic.bundle import write_dynamic_bundle
from ..dynamic.config import SparseConfig
from ..errors import PrumergeError
from ..models.loading import read_config
from ..models.weights import read_tensors, weight_files
from .llava_original import add_image_token, align_names, llava_config, read_llava_weights

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
    if not Path(vision_tower).is_dir():
        raise PrumergeError(f"--vision-tower {vision_tower} is not a directory (a local CLIP checkpoint)")
    predictors = read_tensors(weight_files(source), predictor_name)
    if not predictors:
        raise PrumergeError(f"{source} has no model.image_score_predictor.* weights: not a Dynamic-LLaVA checkpoint")
    config = sparse_config(source, predictors)
    state = read_llava_weights(source, vision_tower)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    image_token = add_image_token(tokenizer, state)
    vocab = state["lm_head.weight"].shape[0]
    hf_config = llava_config(source, vision_tower, image_token, vocab)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(hf_config)
    state = align_names(state, set(model.state_dict()))
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise PrumergeError(f"{source} lacks weights the model needs, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state, strict=True, assign=True)
    with atomic.atomic_dir(output, force=force) as tmp:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        processor = Path(vision_tower) / "preprocessor_config.json"
        if processor.is_file():
            shutil.copyfile(processor, tmp / "model" / "preprocessor_config.json")
        write_dynamic_bundle(tmp / "bundle", tmp / "model", config, "predictor", predictors, TRAINED, [], False)
        record_file = tmp / "bundle" / BUNDLE_FILE
        record = json.loads(record_file.read_text())
        record["model"]["absolute_path"] = str((Path(output) / "model").resolve())  # where it will be
        record["converted_from"] = {"layout": "dynamic-llava", "source": str(Path(source).resolve())}
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    return Path(output) / "bundle"
