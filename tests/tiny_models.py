"""Tiny real HF checkpoints (CLIP, SigLIP, LLaVA), saved with save_pretrained for the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from prumerge_cli.zoo.tokenizer import build_tokenizer

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, patch_size=14)


def sharpen(layers, factor: float = 6.0) -> None:
    """Scale q/k projections so a random tower's attention is peaked, as a trained one's is."""
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)


def save_clip_vision(path: Path, image_size: int = 336, seed: int = 0) -> Path:
    """A 3-layer CLIPVisionModel (576 patches at 336 px)."""
    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(image_size=image_size, **VISION))
    sharpen(model.encoder.layers)
    model.save_pretrained(path)
    return path


def save_clip_full(path: Path, seed: int = 0) -> Path:
    """A full CLIPModel (vision and text towers)."""
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    model = CLIPModel(CLIPConfig(vision_config=dict(image_size=112, **VISION), text_config=text))
    model.save_pretrained(path)
    return path


def save_siglip_vision(path: Path, seed: int = 0) -> Path:
    """A 3-layer SiglipVisionModel (64 patches)."""
    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(image_size=112, **VISION))
    sharpen(model.encoder.layers)
    model.save_pretrained(path)
    return path


def save_siglip_full(path: Path, seed: int = 0) -> Path:
    """A full SiglipModel (vision and text towers)."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    SiglipModel(SiglipConfig(vision_config=dict(image_size=112, **VISION), text_config=text)).save_pretrained(path)
    return path


def save_llava(path: Path, seed: int = 0, layers: int = 1, kv_heads: int = 2) -> Path:
    """A LlavaForConditionalGeneration with a tiny CLIP tower and a tiny Llama (`kv_heads` < 2 for GQA)."""
    torch.manual_seed(seed)
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        vocab_size=128,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=112, **VISION).to_dict(),
        text_config=text.to_dict(),
        image_token_index=127,
    )
    model = LlavaForConditionalGeneration(config)
    sharpen(model.model.vision_tower.encoder.layers)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def save_images(folder: Path, count: int = 3, seed: int = 0) -> list[Path]:
    """Random images with a few bright blobs, in several formats and sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, ext in zip(range(count), ["png", "jpg", "webp", "bmp"] * count, strict=False):
        h, w = 300 + 40 * i, 360 - 20 * i
        img = (rng.random((h, w, 3)) * 80).astype(np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, h - 60), rng.integers(0, w - 60)
            img[y : y + 60, x : x + 60] = rng.integers(150, 255, size=3)
        path = folder / f"img{i}.{ext}"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def altered_copy(model_dir: Path, path: Path) -> Path:
    """A copy of a checkpoint with one weight tensor changed: the same model to every setting but its weights."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, path)
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return path
