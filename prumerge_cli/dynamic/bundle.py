"""Dynamic bundles: `reducer.json` (method `dynamic`, the sparse config, the model it was trained on),
`predictors.safetensors` (predictors and any trained projector / LM tensors) and `training.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from .. import atomic
from ..bundle import BUNDLE_FILE, FORMAT, FORMAT_VERSION, read_bundle
from ..encoder import ReducedVisionEncoder
from ..errors import PrumergeError
from ..lm.positions import DEFAULT_POSITIONS
from ..model_ref import model_record, resolve_model, verify_weights
from ..models.loading import read_config
from ..models.weights import weight_files
from ..versions import package_versions
from .config import SparseConfig
from .model import DynamicLlava
from .predictors import Predictors

METHOD = "dynamic"
WEIGHTS = "predictors.safetensors"
HISTORY = "training.json"
VISION_SOURCES = ("predictor", "prumerge", "prumerge+")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


def check_llava(model_dir: Path) -> None:
    """A LLaVA whose LM is Llama-family, or a clean error."""
    config = read_config(model_dir)
    if config.get("model_type") != "llava":
        raise PrumergeError(f"{model_dir} is not a LLaVA checkpoint; --method dynamic needs one")
    text = (config.get("text_config") or {}).get("model_type", "llama")
    if text not in LLAMA_FAMILY:
        raise PrumergeError(f"the LM of {model_dir} is {text!r}; dynamic predictors support {', '.join(LLAMA_FAMILY)}")


def load_llava(model_dir: Path) -> tuple[LlavaForConditionalGeneration, Any]:
    """The full LLaVA (fp32) and its tokenizer, offline."""
    check_llava(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def vision_encoder(model_dir: Path, source: str, model: LlavaForConditionalGeneration,
                   positions: str = DEFAULT_POSITIONS) -> ReducedVisionEncoder:  # fmt: skip
    """The image side: all tokens for the predictor, or PruMerge(+) placed at `positions`; it uses `model`'s
    projector."""
    if source not in VISION_SOURCES:
        raise PrumergeError(f"unknown vision source {source!r}; choose from {', '.join(VISION_SOURCES)}")
    method = "none" if source == "predictor" else source
    encoder = ReducedVisionEncoder.from_pretrained(model_dir, method, positions=positions)
    encoder.projector = model.model.multi_modal_projector
    return encoder


def write_dynamic_bundle(bundle_dir: Path, model_dir: Path, config: SparseConfig, source: str,
                         state: dict[str, torch.Tensor], trained: list[str], history: list[dict],
                         force: bool, positions: str = DEFAULT_POSITIONS) -> None:  # fmt: skip
    """Write the bundle atomically."""
    files = weight_files(model_dir)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": METHOD,
        "params": {"vision_source": source, "positions": positions},
        "sparse_config": config.to_dict(),
        "trained": trained,
        "model": model_record(model_dir, bundle_dir, files, "llava"),
        "versions": package_versions(),
    }
    with atomic.atomic_dir(bundle_dir, force=force) as tmp:
        save_file(state, str(tmp / WEIGHTS))
        (tmp / HISTORY).write_text(json.dumps(history) + "\n")
        (tmp / BUNDLE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def is_dynamic(bundle_dir: Path) -> bool:
    """Whether a bundle holds learned predictors."""
    return read_bundle(bundle_dir).get("method") == METHOD


def load_dynamic(bundle_dir: Path, verify: bool = True, model_dir: Path | None = None,
                 full_hash: bool = False) -> tuple[DynamicLlava, ReducedVisionEncoder]:  # fmt: skip
    """The model with its predictors, and the image side the bundle was trained with (`model_dir` overrides
    where the model is; weights checked as `bundle.load` does)."""
    from .training import load_trainable_state

    record = read_bundle(bundle_dir)
    if record.get("method") != METHOD:
        raise PrumergeError(f"{bundle_dir} is not a dynamic bundle")
    model_dir = resolve_model(record["model"], Path(bundle_dir), model_dir)
    model, tokenizer = load_llava(model_dir)
    if verify:
        verify_weights(record["model"], model_dir, weight_files(model_dir), full_hash)
    config = SparseConfig.from_dict(record["sparse_config"])
    source = record["params"]["vision_source"]
    predictors = Predictors(model.config.text_config.hidden_size, config)
    dynamic = DynamicLlava(model, tokenizer, predictors, vision=source == "predictor")
    load_trainable_state(dynamic, load_file(str(bundle_dir / WEIGHTS)))
    predictors.eval()
    return dynamic, vision_encoder(model_dir, source, model, record["params"].get("positions", "contiguous"))
