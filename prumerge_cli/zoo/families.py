"""Tiny random checkpoints of the families beyond LLaVA-1.5 (LLaVA-NeXT, LLaVA-OneVision, InternVL, Gemma 3,
Qwen2.5-VL, Qwen3-VL): the real transformers classes with narrow towers and a one-layer LM, at the real models'
image geometry (`real`: tile size, patch grid, grid pinpoints, pooling and pixel shuffle as the released
checkpoints) or at 112 px tiles (`small`, for the tests), each saved with its image processor as a user's
checkpoint is.
Usage: python -m prumerge_cli.zoo.families OUT_DIR [--geometry real|small]"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)

from .. import atomic
from ..cli import quiet_transformers
from .tokenizer import build_tokenizer

IMAGE_TOKEN = 4
"""`<image>` in the embedded tokenizer, which every tiny family model shares."""

TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=160)  # fmt: skip
FAMILIES = ("llava_next", "llava_onevision", "internvl", "gemma3", "qwen2_5_vl", "qwen3_vl")
CHAT_TEMPLATE = ("<s>{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                 "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")  # fmt: skip
"""The embedded model's prompt shape: `<s>`, the image, the question."""
GEMMA_MARKERS = ("<start_of_image>", "<end_of_image>")
"""Gemma 3's image markers, added to the embedded tokenizer for its tiny model."""


@dataclass(frozen=True)
class Geometry:
    """Image sizes of one family: the tile (or image) side in pixels and the patch size."""

    next_tile: int
    next_pinpoints: tuple[tuple[int, int], ...]
    onevision_tile: int
    onevision_pinpoints: tuple[tuple[int, int], ...]
    internvl_tile: int
    internvl_max_tiles: int
    gemma_image: int
    gemma_tokens: int
    qwen_max_side: int


GEOMETRIES = {
    "real": Geometry(336, ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
                     384, tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)), 448, 12, 896, 256, 1344),
    "small": Geometry(112, ((112, 224), (224, 112), (224, 224), (224, 336), (336, 224)),
                      112, ((112, 224), (224, 112), (224, 224), (224, 336), (336, 224)), 112, 6, 224, 16, 224),
}  # fmt: skip
"""`real`: LLaVA-v1.6 (336 px CLIP tiles), OneVision (384 px SigLIP, up to 6x6 tiles), InternVL 2.5/3 (448 px,
up to 12 tiles and a thumbnail), Gemma 3 (896 px, 256 tokens), Qwen2.5-VL (dynamic resolution, up to 1344 px a
side here)."""


def sharpen(layers: Any, attention: str = "self_attn") -> None:
    """Scale q/k projections so a random tower's attention is peaked, as a trained one's is."""
    with torch.no_grad():
        for layer in layers:
            getattr(layer, attention).q_proj.weight.mul_(6.0)
            getattr(layer, attention).k_proj.weight.mul_(6.0)


def llava_next(g: Geometry) -> tuple[Any, Any]:
    """LLaVA-NeXT: a CLIP tower (feature layer -2, [CLS] dropped), any-resolution tiles, a Llama LM."""
    vision = CLIPVisionConfig(image_size=g.next_tile, patch_size=14, **TOWER)
    pinpoints = [list(p) for p in g.next_pinpoints]
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=LlamaConfig(**TEXT).to_dict(),
                             image_token_index=IMAGE_TOKEN, image_grid_pinpoints=pinpoints,
                             vision_feature_layer=-2)  # fmt: skip
    model = LlavaNextForConditionalGeneration(config)
    sharpen(model.model.vision_tower.encoder.layers)
    processor = LlavaNextImageProcessorPil(size={"shortest_edge": g.next_tile},
                                           crop_size={"height": g.next_tile, "width": g.next_tile},
                                           image_grid_pinpoints=pinpoints)  # fmt: skip
    return model, processor


def llava_onevision(g: Geometry, max_tiles: int = 9) -> tuple[Any, Any]:
    """LLaVA-OneVision: a SigLIP tower without [CLS] (full strategy, last layer), a Llama LM; an unpadded grid
    larger than about `max_tiles` tiles is downscaled."""
    vision = SiglipVisionConfig(image_size=g.onevision_tile, patch_size=14, vision_use_head=False, **TOWER)
    pinpoints = [list(p) for p in g.onevision_pinpoints]
    config = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=LlamaConfig(**TEXT).to_dict(),
                                  image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                                  image_grid_pinpoints=pinpoints,
                                  vision_feature_select_strategy="full",
                                  vision_aspect_ratio=f"anyres_max_{max_tiles}")  # fmt: skip
    model = LlavaOnevisionForConditionalGeneration(config)
    sharpen(model.model.vision_tower.encoder.layers)
    processor = LlavaOnevisionImageProcessorPil(size={"height": g.onevision_tile, "width": g.onevision_tile},
                                                image_grid_pinpoints=pinpoints)  # fmt: skip
    return model, processor


def internvl(g: Geometry) -> tuple[Any, Any]:
    """InternVL: an InternViT ([CLS] dropped), tiles pixel-shuffled 2x2, a Llama LM."""
    side = g.internvl_tile // 14
    vision = dict(TOWER, image_size=[g.internvl_tile] * 2, patch_size=[14, 14])
    config = InternVLConfig(vision_config=vision, text_config={"model_type": "llama", **TEXT},
                            image_token_id=IMAGE_TOKEN, image_seq_length=(side // 2) ** 2, downsample_ratio=0.5,
                            vision_feature_layer=-1)  # fmt: skip
    model = InternVLForConditionalGeneration(config)
    sharpen(model.model.vision_tower.encoder.layer, "attention")
    size = {"height": g.internvl_tile, "width": g.internvl_tile}
    processor = GotOcr2ImageProcessorPil(size=size, crop_to_patches=True, min_patches=1,
                                         max_patches=g.internvl_max_tiles)  # fmt: skip
    return model, processor


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded tokenizer with Gemma 3's image markers, named as its processor asks for them."""
    words = build_tokenizer(extra=GEMMA_MARKERS)
    return PreTrainedTokenizerFast(tokenizer_object=words.backend_tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens={"image_token": "<image>", "boi_token": GEMMA_MARKERS[0],
                                                         "eoi_token": GEMMA_MARKERS[1]})  # fmt: skip


def gemma3(g: Geometry) -> tuple[Any, Any]:
    """Gemma 3: a SigLIP tower without [CLS], pooled into `gemma_tokens` tokens, a Gemma 3 LM."""
    text = dict(TEXT, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
    vision = SiglipVisionConfig(image_size=g.gemma_image, patch_size=14, vision_use_head=False, **TOWER)
    boi, eoi = gemma_tokenizer().convert_tokens_to_ids(list(GEMMA_MARKERS))
    config = Gemma3Config(vision_config=vision.to_dict(), text_config=text, mm_tokens_per_image=g.gemma_tokens,
                          image_token_index=IMAGE_TOKEN, boi_token_index=boi, eoi_token_index=eoi)  # fmt: skip
    model = Gemma3ForConditionalGeneration(config)
    sharpen(model.model.vision_tower.encoder.layers)
    return model, Gemma3ImageProcessorPil(size={"height": g.gemma_image, "width": g.gemma_image})


def qwen2_5_vl(g: Geometry) -> tuple[Any, Any]:
    """Qwen2.5-VL: a windowed ViT (windows of 112 px, the last block full), 2x2 merger, M-RoPE, a Qwen2 LM."""
    vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=TEXT["hidden_size"],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[2], in_channels=3)  # fmt: skip
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=dict(TEXT, rope_parameters=rope, bos_token_id=2,
                                                                     eos_token_id=3, pad_token_id=0),
                              image_token_id=IMAGE_TOKEN, video_token_id=7, vision_start_token_id=5,
                              vision_end_token_id=6)  # fmt: skip
    return with_qwen_processor(Qwen2_5_VLForConditionalGeneration(config), 14, g)


def qwen3_vl(g: Geometry) -> tuple[Any, Any]:
    """Qwen3-VL: a ViT of full attention with learned positions (a 4x4 grid resampled), deepstack mergers after
    the first two blocks, 2x2 merger, interleaved M-RoPE, a Qwen3 LM."""
    vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=TEXT["hidden_size"],
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1], in_channels=3)  # fmt: skip
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 10000.0}
    text = dict(TEXT, head_dim=16, rope_parameters=rope, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    config = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=7,
                           vision_start_token_id=5, vision_end_token_id=6)  # fmt: skip
    return with_qwen_processor(Qwen3VLForConditionalGeneration(config), 16, g)


def with_qwen_processor(model: Any, patch: int, g: Geometry) -> tuple[Any, Any]:
    """A Qwen model with peaked tower attention (the q and k thirds of each qkv scaled, as a trained tower's),
    and its image processor: 2x2 merges of `patch`-pixel patches, images from 4 merges to `qwen_max_side`."""
    width = model.config.vision_config.hidden_size
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[: 2 * width].mul_(6.0)
    side = g.qwen_max_side
    processor = Qwen2VLImageProcessorPil(min_pixels=(4 * patch) ** 2, max_pixels=side * side, patch_size=patch,
                                         merge_size=2, temporal_patch_size=2)  # fmt: skip
    return model, processor


BUILDERS = {"llava_next": llava_next, "llava_onevision": llava_onevision, "internvl": internvl, "gemma3": gemma3,
            "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl}  # fmt: skip


def build_family(name: str, geometry: str = "real", seed: int = 0, **options: Any) -> tuple[Any, Any]:
    """The random model `name` (eval mode, pad id 0) and its image processor."""
    torch.manual_seed(seed)
    model, processor = BUILDERS[name](GEOMETRIES[geometry], **options)
    model.generation_config.pad_token_id = 0
    return model.eval(), processor


def save_family(name: str, path: Path, geometry: str = "real", force: bool = False) -> Path:
    """Write `name` as a checkpoint directory: weights, config, the embedded tokenizer and the image processor
    (LLaVA-NeXT and Gemma 3: their whole processors, so `AutoProcessor` loads them)."""
    model, image_processor = build_family(name, geometry)
    with atomic.atomic_dir(path, force) as tmp:
        model.save_pretrained(tmp)
        tokenizer = gemma_tokenizer() if name == "gemma3" else build_tokenizer()
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        if name == "llava_next":
            LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE).save_pretrained(tmp)  # fmt: skip
        if name == "gemma3":
            template = CHAT_TEMPLATE.replace("<image>", GEMMA_MARKERS[0])
            Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                            image_seq_length=model.config.mm_tokens_per_image).save_pretrained(tmp)  # fmt: skip
    return path


def main() -> None:
    """Command-line entry: write the six tiny family checkpoints under OUT_DIR."""
    quiet_transformers()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="real")
    parser.add_argument("--force", action="store_true", help="replace checkpoints that exist")
    args = parser.parse_args()
    for name in FAMILIES:
        print(f"{name}: {save_family(name, args.out / name, args.geometry, args.force)}")


if __name__ == "__main__":
    main()
