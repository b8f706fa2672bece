"""`prumerge convert --from prumerge-lora`: an upstream PruMerge LoRA fine-tune (a LoRA directory as LLaVA's
`train_mem.py --lora_enable` writes it: `adapter_config.json`, `adapter_model.bin` with PEFT 0.4 names,
`non_lora_trainables.bin` with the trained projector) plus the original-LLaVA base checkpoint it was trained on,
to a Hugging Face LLaVA directory (`OUT/model`, the base) and a fine-tuned bundle (`OUT/bundle`: the adapters in
peft's current format, the projector, the method it was trained with)."""

from __future__ import annotations

import re
from pathlib import Path

from peft import set_peft_model_state_dict

from .. import atomic
from ..encoder import ReducedVisionEncoder
from ..errors import PrumergeError
from ..finetune.bundle import write_finetuned_bundle
from ..finetune.lora import LINEAR_LAYERS, LoraSettings, attach_lora
from ..jsonfiles import read_json_object
from ..models.weights import read_tensors
from .llava_original import build_hf_llava, hf_name, point_bundle_at, save_hf_llava

METHODS = ("prumerge", "prumerge+")
PROJECTOR = "model.multi_modal_projector."

UPSTREAM_POSITIONS = "contiguous"
"""Where upstream PruMerge puts the kept tokens: positions 1..k after the text before the image."""


def adapter_name(key: str) -> str | None:
    """peft's current save name (on our HF LLaVA) of a PEFT 0.4 LoRA weight of the original-LLaVA model."""
    key = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)
    match = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_[AB])\.weight", key)
    if match is None:
        return None
    return f"base_model.model.model.language_model.layers.{match[1]}.{match[2]}.{match[3]}.{match[4]}.weight"


def projector_name(key: str) -> str | None:
    """The HF projector's own name (`linear_1.weight`) of a `non_lora_trainables` tensor."""
    name = hf_name(key.removeprefix("base_model.model."))
    return name.removeprefix(PROJECTOR) if name and name.startswith(PROJECTOR) else None


def lora_files(lora_dir: Path, stem: str) -> list[Path]:
    """`stem.safetensors`, else `stem.bin`, in `lora_dir`."""
    for suffix in (".safetensors", ".bin"):
        if (lora_dir / f"{stem}{suffix}").is_file():
            return [lora_dir / f"{stem}{suffix}"]
    raise PrumergeError(f"{lora_dir} has no {stem}.safetensors or {stem}.bin: not an upstream LoRA directory")


def lora_settings(lora_dir: Path, adapters: dict) -> LoraSettings:
    """Rank, alpha and dropout of `adapter_config.json`; targets from the adapter weights themselves."""
    config = read_json_object(lora_dir / "adapter_config.json", f"{lora_dir} has no adapter_config.json")
    targets = {key.split(".")[-3] for key in adapters}
    if not targets <= set(LINEAR_LAYERS):
        raise PrumergeError(f"adapters on {sorted(targets - set(LINEAR_LAYERS))}: only the LM's linear layers convert")
    return LoraSettings(int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0)),
                        tuple(t for t in LINEAR_LAYERS if t in targets))  # fmt: skip


def convert_prumerge_lora(lora_dir: Path, base: Path, vision_tower: Path, method: str, output: Path,
                          force: bool = False) -> Path:  # fmt: skip
    """Write `output/model` and `output/bundle` atomically; returns the bundle directory."""
    if method not in METHODS:
        raise PrumergeError(f"--method takes {' or '.join(METHODS)} (what the LoRA was trained with); got {method!r}")
    adapters = read_tensors(lora_files(lora_dir, "adapter_model"), adapter_name)
    if not adapters:
        raise PrumergeError(f"{lora_dir} holds no LoRA weights of the LM's layers")
    projector = read_tensors(lora_files(lora_dir, "non_lora_trainables"), projector_name)
    settings = lora_settings(lora_dir, adapters)
    model, tokenizer = build_hf_llava(base, vision_tower)
    with atomic.atomic_dir(output, force=force) as tmp:
        save_hf_llava(model, tokenizer, vision_tower, tmp / "model")
        model.model.multi_modal_projector.load_state_dict({**model.model.multi_modal_projector.state_dict(),
                                                           **projector})  # fmt: skip
        peft_model = attach_lora(model, settings)
        result = set_peft_model_state_dict(peft_model, adapters)
        if result.unexpected_keys:
            raise PrumergeError(f"LoRA weights that fit no layer of {base}, e.g. {result.unexpected_keys[0]}")
        encoder = ReducedVisionEncoder.from_pretrained(tmp / "model", method, positions=UPSTREAM_POSITIONS)
        recipe = {"lora": settings.to_dict(), "positions": UPSTREAM_POSITIONS, "template": "vicuna_v1",
                  "projector_from_lora_dir": bool(projector)}  # fmt: skip
        write_finetuned_bundle(tmp / "bundle", encoder, peft_model, model.model.multi_modal_projector, recipe, [],
                               False)  # fmt: skip
        point_bundle_at(tmp / "bundle", Path(output) / "model", "prumerge-lora", lora_dir)
    return Path(output) / "bundle"
