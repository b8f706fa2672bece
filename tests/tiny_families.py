"""Tiny random checkpoints of the any-resolution and pooled families (LLaVA-NeXT, LLaVA-OneVision, InternVL,
Gemma 3), saved with `save_pretrained` and loaded back as a user's checkpoint, with their real processors."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    SiglipVisionConfig,
)

from prumerge_cli.zoo.tokenizer import build_tokenizer

from .tiny_models import VISION

IMAGE_TOKEN = 4
"""`<image>` in the embedded tokenizer, which every tiny family model here shares."""

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=160)  # fmt: skip
PINPOINTS = [[112, 224], [224, 112], [224, 224], [224, 336], [336, 224]]


def sharpen(layers, attention: str = "self_attn") -> None:
    """Scale q/k projections so a random tower's attention is peaked, as a trained one's is."""
    with torch.no_grad():
        for layer in layers:
            getattr(layer, attention).q_proj.weight.mul_(6.0)
            getattr(layer, attention).k_proj.weight.mul_(6.0)


def llava_next(seed: int = 0):
    """LLaVA-NeXT: a CLIP tower at 112 px (8x8 patches per tile), tiles up to 224x336, a Llama LM."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=112, **VISION).to_dict(),
                             text_config=LlamaConfig(**TEXT).to_dict(), image_token_index=IMAGE_TOKEN,
                             image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2)  # fmt: skip
    model = LlavaNextForConditionalGeneration(config)
    sharpen(model.model.vision_tower.encoder.layers)
    return model


def llava_onevision(seed: int = 0, max_tiles: int = 9):
    """LLaVA-OneVision: a SigLIP tower at 112 px without CLS (full strategy, last layer), a Llama LM; an unpadded
    grid larger than about `max_tiles` tiles is downscaled."""
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(image_size=112, vision_use_head=False,
                                                                   **VISION).to_dict(),
                                  text_config=LlamaConfig(**TEXT).to_dict(), image_token_index=IMAGE_TOKEN,
                                  image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full",
                                  vision_aspect_ratio=f"anyres_max_{max_tiles}")  # fmt: skip
    model = LlavaOnevisionForConditionalGeneration(config)
    sharpen(model.model.vision_tower.encoder.layers)
    return model


def internvl(seed: int = 0):
    """InternVL: an InternViT at 112 px (8x8 patches, pixel-shuffled to 4x4 = 16 tokens a tile), a Llama LM."""
    torch.manual_seed(seed)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  image_size=[112, 112], patch_size=[14, 14])  # fmt: skip
    config = InternVLConfig(vision_config=vision, text_config={"model_type": "llama", **TEXT},
                            image_token_id=IMAGE_TOKEN, image_seq_length=16, downsample_ratio=0.5,
                            vision_feature_layer=-1)  # fmt: skip
    model = InternVLForConditionalGeneration(config)
    sharpen(model.model.vision_tower.encoder.layer, "attention")
    return model


def gemma3(seed: int = 0):
    """Gemma 3: a SigLIP tower at 224 px (16x16 patches), pooled 4x4 to 16 tokens, a Gemma 3 LM."""
    torch.manual_seed(seed)
    text = dict(TEXT, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
    config = Gemma3Config(vision_config=SiglipVisionConfig(image_size=224, vision_use_head=False,
                                                           **VISION).to_dict(),
                          text_config=text, mm_tokens_per_image=16, image_token_index=IMAGE_TOKEN,
                          boi_token_index=5, eoi_token_index=6)  # fmt: skip
    model = Gemma3ForConditionalGeneration(config)
    sharpen(model.model.vision_tower.encoder.layers)
    return model


BUILDERS = {"llava_next": llava_next, "llava_onevision": llava_onevision, "internvl": internvl, "gemma3": gemma3}


def save_family(name: str, path: Path) -> Path:
    """Save the tiny model `name` and the embedded tokenizer to `path`."""
    model = BUILDERS[name]()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def load_family(path: Path):
    """The saved model, loaded back in fp32 for evaluation as a user loads it."""
    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
