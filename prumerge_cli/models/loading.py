"""Offline loading of a vision tower (and LLaVA projector) from a local checkpoint directory."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoImageProcessor, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
from transformers.models.llava.configuration_llava import LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from ..dtypes import torch_dtype
from ..errors import PrumergeError
from ..jsonfiles import read_json_object
from .weights import read_tensors, weight_files

Family = Literal["clip", "siglip"]
SUPPORTED = ("clip", "clip_vision_model", "siglip", "siglip_vision_model", "llava")


@dataclass
class LoadedModel:
    """A checkpoint's vision side, ready to run."""

    model_type: str
    family: Family
    vision: nn.Module
    projector: nn.Module | None
    feature_layer: int
    processor: Any
    weight_files: list[Path]


def read_config(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's config.json, with clean errors for a missing directory or file."""
    if model_dir.is_file():
        raise PrumergeError(f"{model_dir} is a file; pass the checkpoint directory that holds its config.json and "
                            f"weights ({model_dir.parent})")  # fmt: skip
    if not model_dir.is_dir():
        hint = ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model_dir)):  # looks like a hub id, e.g. llava-hf/llava-1.5-7b-hf
            hint = (f"; prumerge reads local checkpoints only: download it first, e.g. `huggingface-cli download "
                    f"{model_dir} --local-dir DIR`, and pass DIR")  # fmt: skip
        raise PrumergeError(f"model directory {model_dir} does not exist{hint}")
    return read_json_object(
        model_dir / "config.json", f"{model_dir} has no config.json; it is not a Hugging Face checkpoint"
    )


def load_model(model_dir: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa") -> LoadedModel:
    """Load the vision tower of a CLIP, SigLIP or LLaVA checkpoint (and LLaVA's projector), offline."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise PrumergeError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED)}")
    weights_dtype = torch_dtype(dtype)
    try:
        vision_config, feature_layer, llava = _vision_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise PrumergeError(f"{model_dir}/config.json is not a valid {model_type} config: {exc}") from None
    family: Family = "siglip" if vision_config.model_type == "siglip_vision_model" else "clip"
    if llava is not None and family == "clip" and llava.vision_feature_select_strategy != "default":
        raise PrumergeError("only vision_feature_select_strategy='default' (CLS dropped) is supported for CLIP")

    files = weight_files(model_dir)
    model_cls = SiglipVisionModel if family == "siglip" else CLIPVisionModel
    vision = model_cls._from_config(vision_config, attn_implementation=attn_implementation)
    _load_state(vision, read_tensors(files, _vision_key(model_type)), model_dir)
    projector = None
    if llava is not None:
        projector = LlavaMultiModalProjector(llava)
        _load_state(projector, read_tensors(files, _projector_key), model_dir)
        projector = projector.to(weights_dtype).eval().requires_grad_(False)
    vision = vision.to(weights_dtype).eval().requires_grad_(False)
    return LoadedModel(
        model_type, family, vision, projector, feature_layer, _processor(model_dir, family, vision_config), files
    )


def _vision_config(config: dict[str, Any]) -> tuple[Any, int, LlavaConfig | None]:
    model_type = config["model_type"]
    if model_type == "llava":
        llava = LlavaConfig(**{k: v for k, v in config.items() if k != "model_type"})
        layer = llava.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("a list of vision_feature_layer values is not supported")
        return llava.vision_config, layer, llava
    cls = SiglipVisionConfig if model_type.startswith("siglip") else CLIPVisionConfig
    sub = config["vision_config"] if model_type in ("clip", "siglip") else config
    return cls(**{k: v for k, v in sub.items() if k != "model_type"}), -2 if cls is CLIPVisionConfig else -1, None


def _vision_key(model_type: str):
    def rename(key: str) -> str | None:
        if model_type == "llava":
            if "vision_tower." not in key:
                return None
            key = key.split("vision_tower.", 1)[1]
        elif model_type in ("clip", "siglip") and not key.startswith("vision_model."):
            return None
        return key.removeprefix("vision_model.")

    return rename


def _projector_key(key: str) -> str | None:
    return key.split("multi_modal_projector.", 1)[1] if "multi_modal_projector." in key else None


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], model_dir: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise PrumergeError(f"weights in {model_dir} do not match its config: {detail}")
    bad = [k for k, t in state.items() if t.shape != expected[k].shape]
    if bad:
        raise PrumergeError(f"weights in {model_dir} do not match its config: shape of {bad[0]}")
    module.load_state_dict(state)


def _processor(model_dir: Path, family: Family, vision_config: Any) -> Any:
    if (model_dir / "preprocessor_config.json").is_file():
        try:
            return AutoImageProcessor.from_pretrained(str(model_dir), backend="pil")
        except (OSError, ValueError, TypeError) as exc:
            raise PrumergeError(f"{model_dir}/preprocessor_config.json cannot be used: {exc}") from None
    side = vision_config.image_size
    if family == "siglip":
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        return SiglipImageProcessorPil(size={"height": side, "width": side})
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
