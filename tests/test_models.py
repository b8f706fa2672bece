"""Loading real HF checkpoints offline, and the tower's signals against a full forward with hooks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionModel, LlavaForConditionalGeneration, SiglipVisionModel

from prumerge_cli import PrumergeError, ReducedVisionEncoder
from prumerge_cli.models.images import collect_images, open_image, preprocess
from prumerge_cli.models.loading import load_model

from .official_reference import reference_reduce, tower_signals_by_hooks


def pixels(encoder, image_paths):
    return preprocess(encoder.processor, [open_image(p) for p in image_paths])


def test_tower_signals_equal_hooked_full_forward(clip_dir, image_paths):
    enc = ReducedVisionEncoder.from_pretrained(clip_dir, "prumerge")
    px = pixels(enc, image_paths)
    hf = CLIPVisionModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        x, a, k = tower_signals_by_hooks(hf, px)
        signals = enc.tower(px)
    torch.testing.assert_close(signals.features, x)
    torch.testing.assert_close(signals.scores, a)
    torch.testing.assert_close(signals.keys, k)
    assert enc.tower.score_index == 2 and enc.tower.num_patches == 576


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_end_to_end_parity_with_official_loop(clip_dir, image_paths, method):
    enc = ReducedVisionEncoder.from_pretrained(clip_dir, method)
    px = pixels(enc, image_paths)
    hf = CLIPVisionModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        x, a, k = tower_signals_by_hooks(hf, px)
        out = enc(px)
    assert (out.lengths > 1).all()
    for b in range(len(image_paths)):
        idx, ref = reference_reduce(x[b], a[b], k[b], plus=method == "prumerge+")
        n = int(out.lengths[b])
        assert out.indices[b, : n - 1].tolist() == idx.tolist()
        torch.testing.assert_close(out.tokens[b, :n], ref, atol=1e-4, rtol=1e-4)


def test_sdpa_and_eager_agree(clip_dir, image_paths):
    sdpa = ReducedVisionEncoder.from_pretrained(clip_dir, "prumerge+", attn_implementation="sdpa")
    eager = ReducedVisionEncoder.from_pretrained(clip_dir, "prumerge+", attn_implementation="eager")
    px = pixels(sdpa, image_paths)
    a, b = sdpa(px), eager(px)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-4, rtol=1e-4)


def test_layers_past_the_score_projections_never_run(clip_dir, image_paths):
    enc = ReducedVisionEncoder.from_pretrained(clip_dir, "prumerge")
    last = enc.tower.vision.encoder.layers[2]
    calls = []
    for module in (last.mlp, last.self_attn.v_proj, enc.tower.vision.post_layernorm):
        module.register_forward_hook(lambda *args: calls.append(1))
    enc(pixels(enc, image_paths[:1]))
    assert calls == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_towers(clip_dir, image_paths, dtype):
    enc = ReducedVisionEncoder.from_pretrained(clip_dir, "prumerge+", dtype=dtype)
    out = enc(pixels(enc, image_paths))
    assert out.tokens.dtype == getattr(torch, dtype)
    assert torch.isfinite(out.tokens).all() and (out.lengths >= 1).all()


def test_clip_full_checkpoint_loads_its_vision_tower(clip_full_dir):
    from transformers import CLIPModel

    model = load_model(clip_full_dir)
    full = CLIPModel.from_pretrained(clip_full_dir)
    torch.testing.assert_close(
        model.vision.embeddings.patch_embedding.weight, full.vision_model.embeddings.patch_embedding.weight
    )
    assert model.feature_layer == -2 and model.projector is None


def test_siglip_full_checkpoint_loads_its_vision_tower(tmp_path):
    from transformers import SiglipModel

    from .tiny_models import save_siglip_full

    path = save_siglip_full(tmp_path / "siglip_full")
    model = load_model(path)
    full = SiglipModel.from_pretrained(path)
    torch.testing.assert_close(model.vision.embeddings.patch_embedding.weight,
                               full.vision_model.embeddings.patch_embedding.weight)  # fmt: skip
    assert model.family == "siglip" and model.feature_layer == -1


def test_siglip_scores_are_mean_received_attention(siglip_dir, image_paths):
    enc = ReducedVisionEncoder.from_pretrained(siglip_dir, "prumerge", attn_implementation="eager")
    px = pixels(enc, image_paths[:2])
    hf = SiglipVisionModel.from_pretrained(siglip_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        attn = hf(pixel_values=px, output_attentions=True).attentions[enc.tower.score_index]
        signals = enc.tower(px)
    torch.testing.assert_close(signals.scores, attn.mean(dim=(1, 2)))
    assert signals.features.shape[1] == 64  # no CLS to drop
    out = enc(px)
    assert (out.lengths >= 1).all() and out.tokens.shape[-1] == 64


def test_llava_checkpoint_gives_tower_and_projector(llava_dir, image_paths):
    enc = ReducedVisionEncoder.from_pretrained(llava_dir, "prumerge+")
    full = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    torch.testing.assert_close(enc.projector.linear_1.weight, full.model.multi_modal_projector.linear_1.weight)
    px = pixels(enc, image_paths)
    out = enc(px, project=True)
    assert out.tokens.shape[-1] == full.config.text_config.hidden_size
    assert not out.tokens[~out.mask].any()
    with torch.no_grad():
        ref = full.model.get_image_features(pixel_values=px)
    ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
    none = ReducedVisionEncoder.from_pretrained(llava_dir, "none")(px, project=True)
    torch.testing.assert_close(
        none.tokens, torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref, atol=1e-5, rtol=1e-5
    )


def test_loading_errors_are_clean(tmp_path, clip_dir):
    with pytest.raises(PrumergeError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(PrumergeError, match=r"no config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PrumergeError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PrumergeError, match="unsupported architecture 'bert'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(PrumergeError, match="no weights"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(PrumergeError, match="cannot read weights"):
        load_model(tmp_path)


def test_image_collection(tmp_path, image_paths):
    assert collect_images([image_paths[0].parent]) == sorted(image_paths)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(PrumergeError, match="cannot read image"):
        open_image(bad)
    with pytest.raises(PrumergeError, match="does not exist"):
        collect_images([tmp_path / "nope.png"])
