"""Fine-tuned bundles: `reducer.json` (the reducer, the model, `"regime": "fine-tuned"` and the recipe), the LM's
LoRA adapters in peft's format (`adapter/adapter_config.json`, `adapter/adapter_model.safetensors`), the trained
projector (`projector.safetensors`) and the loss log (`training.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import atomic
from ..bundle import BUNDLE_FILE, FORMAT, FORMAT_VERSION, read_bundle
from ..encoder import ReducedVisionEncoder
from ..errors import PrumergeError
from ..lm.llava_lm import LlavaLm
from ..model_ref import model_record, resolve_model, verify_weights
from ..models.weights import weight_files
from ..versions import package_versions

REGIME = "fine-tuned"
ADAPTER_DIR = "adapter"
PROJECTOR_FILE = "projector.safetensors"
HISTORY = "training.json"


def regime(record: dict[str, Any]) -> str:
    """ "fine-tuned" or "training-free"."""
    return record.get("regime", "training-free")


def write_finetuned_bundle(bundle_dir: Path, encoder: ReducedVisionEncoder, peft_model: nn.Module,
                           projector: nn.Module, recipe: dict[str, Any], history: list[dict],
                           force: bool) -> None:  # fmt: skip
    """Write the bundle atomically."""
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **encoder.settings(),
        "regime": REGIME,
        "finetune": recipe,
        "model": model_record(encoder.model_dir, bundle_dir, encoder.model.weight_files, encoder.model.model_type),
        "versions": package_versions("peft"),
    }
    with atomic.atomic_dir(bundle_dir, force=force) as tmp:
        peft_model.save_pretrained(str(tmp / ADAPTER_DIR))
        (tmp / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        save_file({k: v.detach().contiguous() for k, v in projector.state_dict().items()}, str(tmp / PROJECTOR_FILE))
        (tmp / HISTORY).write_text(json.dumps(history) + "\n")
        (tmp / BUNDLE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_projector(bundle_dir: Path, projector: nn.Module) -> None:
    """Put a fine-tuned bundle's projector weights into `projector`."""
    projector.load_state_dict(load_file(str(Path(bundle_dir) / PROJECTOR_FILE)))


def load_finetuned_lm(bundle_dir: str | Path, model_dir: str | Path | None = None, merge: bool = False,
                      full_hash: bool = False) -> LlavaLm:  # fmt: skip
    """The bundle's LLaVA with its adapters applied (merged into the weights if `merge`) and its projector."""
    from peft import PeftModel

    record = read_bundle(bundle_dir)
    if regime(record) != REGIME:
        raise PrumergeError(f"{bundle_dir} is not a fine-tuned bundle")
    model = resolve_model(record["model"], Path(bundle_dir), None if model_dir is None else Path(model_dir))
    lm = LlavaLm.from_pretrained(model)
    verify_weights(record["model"], model, weight_files(Path(model)), full_hash)
    peft_model = PeftModel.from_pretrained(lm.model, str(Path(bundle_dir) / ADAPTER_DIR))
    load_projector(Path(bundle_dir), lm.model.model.multi_modal_projector)
    if merge:
        lm = LlavaLm(peft_model.merge_and_unload(), lm.tokenizer)
    lm.model.eval()
    return lm


def merge_lora(bundle_dir: Path, output: Path, force: bool = False) -> Path:
    """Write a plain `LlavaForConditionalGeneration` directory with the adapters and projector merged in."""
    lm = load_finetuned_lm(bundle_dir, merge=True)
    with atomic.atomic_dir(output, force=force) as tmp, torch.no_grad():
        lm.model.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        source = resolve_model(read_bundle(bundle_dir)["model"], Path(bundle_dir))
        for name in ("preprocessor_config.json", "processor_config.json", "chat_template.json"):
            if (source / name).is_file():
                (tmp / name).write_bytes((source / name).read_bytes())
    return output
