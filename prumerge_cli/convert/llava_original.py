"""Original-LLaVA checkpoints (`LlavaLlamaForCausalLM`, `model_type` "llava_llama"): their weight names mapped
to Hugging Face `LlavaForConditionalGeneration` (the mapping of transformers' `convert_llava_weights_to_hf`),
and their config turned into a `LlavaConfig`. The vision tower's config, and its weights when the checkpoint
leaves them out (LLaVA-1.5 loads them from `mm_vision_tower`), come from a local CLIP directory."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ..bundle import BUNDLE_FILE
from ..errors import PrumergeError
from ..models.loading import read_config
from ..models.weights import read_tensors, weight_files

PROJECTOR_LAYERS = {"0": "linear_1", "2": "linear_2"}
IMAGE_TOKEN = "<image>"


def hf_name(key: str) -> str | None:
    """The `LlavaForConditionalGeneration` name of an original-LLaVA weight (None: not a LLaVA weight)."""
    if key.startswith("model.vision_tower.vision_tower."):
        return "model.vision_tower." + key.removeprefix("model.vision_tower.vision_tower.")
    if match := re.fullmatch(r"model\.mm_projector\.(\d+)\.(weight|bias)", key):
        layer = PROJECTOR_LAYERS.get(match[1])
        return None if layer is None else f"model.multi_modal_projector.{layer}.{match[2]}"
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "model.language_model." + key.removeprefix("model.")
    if key.startswith("lm_head."):
        return key
    return None


def read_llava_weights(source: Path, vision_tower: Path) -> dict[str, torch.Tensor]:
    """Every weight of the HF model: the checkpoint's, plus the vision tower's if the checkpoint has none."""
    state = read_tensors(weight_files(source), hf_name)
    if not any(k.startswith("model.vision_tower.") for k in state):
        tower = read_tensors(weight_files(vision_tower), _tower_name)
        if not tower:
            raise PrumergeError(f"{vision_tower} holds no CLIP vision weights (vision_model.*)")
        state.update(tower)
    if "lm_head.weight" not in state or not any(k.startswith("model.multi_modal_projector.") for k in state):
        raise PrumergeError(f"{source} is not an original-LLaVA checkpoint (no lm_head or model.mm_projector)")
    return state


TOWER_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def _tower_name(key: str) -> str | None:
    """CLIPModel / CLIPVisionModel names of the vision transformer -> the LLaVA tower's (`align_names` then
    matches the installed transformers' nesting)."""
    key = key.removeprefix("vision_model.")
    return "model.vision_tower." + key if key.startswith(TOWER_PARTS) else None


def align_names(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Vision-tower names with or without the `vision_model.` level, whichever the model at hand uses."""
    prefix, nested = "model.vision_tower.", "model.vision_tower.vision_model."
    out = {}
    for key, tensor in state.items():
        if key not in expected and key.startswith(nested) and prefix + key.removeprefix(nested) in expected:
            key = prefix + key.removeprefix(nested)
        elif key not in expected and key.startswith(prefix) and nested + key.removeprefix(prefix) in expected:
            key = nested + key.removeprefix(prefix)
        out[key] = tensor
    return out


def llava_config(source: Path, vision_tower: Path, image_token_id: int, vocab_size: int) -> LlavaConfig:
    """The HF config of an original-LLaVA checkpoint with a `mlp2x_gelu` projector."""
    original = read_config(source)
    if original.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise PrumergeError(f"projector {original.get('mm_projector_type')!r}: only LLaVA-1.5's mlp2x_gelu converts")
    if original.get("mm_vision_select_feature", "patch") != "patch":
        raise PrumergeError("only mm_vision_select_feature 'patch' converts")
    vision = read_config(vision_tower)
    vision = vision.get("vision_config", vision)
    text = {k: v for k, v in original.items() if k in LlamaConfig().to_dict() and k not in ("architectures",)}
    text.update(model_type="llama", vocab_size=vocab_size)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"}).to_dict(),
        text_config=LlamaConfig(**text).to_dict(),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default",
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
    )


def add_image_token(tokenizer: Any, state: dict[str, torch.Tensor], pad_to: int = 64) -> int:
    """Give the tokenizer `<image>` if it lacks it and grow the embeddings and LM head to match (new rows are
    the mean of the old ones, rounded up to a multiple of `pad_to`, as the HF LLaVA conversion does); returns
    the token's id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    wanted = -(-len(tokenizer) // pad_to) * pad_to
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        rows = state[key]
        if rows.shape[0] < wanted:
            extra = rows.float().mean(0, keepdim=True).to(rows.dtype).expand(wanted - rows.shape[0], -1)
            state[key] = torch.cat([rows, extra])
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def build_hf_llava(source: Path, vision_tower: Path) -> tuple[LlavaForConditionalGeneration, Any]:
    """The HF LLaVA (weights assigned, not copied) and tokenizer of an original-LLaVA checkpoint."""
    if not Path(vision_tower).is_dir():
        raise PrumergeError(f"--vision-tower {vision_tower} is not a directory (a local CLIP checkpoint)")
    state = read_llava_weights(source, vision_tower)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    image_token = add_image_token(tokenizer, state)
    config = llava_config(source, vision_tower, image_token, state["lm_head.weight"].shape[0])
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    state = align_names(state, set(model.state_dict()))
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise PrumergeError(f"{source} lacks weights the model needs, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), tokenizer


def save_hf_llava(model: LlavaForConditionalGeneration, tokenizer: Any, vision_tower: Path, directory: Path) -> None:
    """Write the model, its tokenizer and the tower's image processor to `directory`."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor = Path(vision_tower) / "preprocessor_config.json"
    if processor.is_file():
        shutil.copyfile(processor, directory / "preprocessor_config.json")


def point_bundle_at(bundle_dir: Path, final_model_dir: Path, layout: str, source: Path) -> None:
    """A bundle written beside its model in a temporary directory: its absolute fallback path becomes where the
    model will be, and it records what it was converted from."""
    record_file = bundle_dir / BUNDLE_FILE
    record = json.loads(record_file.read_text())
    record["model"]["absolute_path"] = str(final_model_dir.resolve())
    record["converted_from"] = {"layout": layout, "source": str(Path(source).resolve())}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
