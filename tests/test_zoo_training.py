"""Pieces of the zoo's training recipe: the region loss's cells and targets, precision, determinism, the card."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from prumerge_cli.versions import cpu_name
from prumerge_cli.zoo.build import Recipe
from prumerge_cli.zoo.card import model_card
from prumerge_cli.zoo.clip_training import (
    PATCH,
    PHRASES,
    caption_batch,
    cell_pooling,
    clip_config,
    image_processor,
    pair_batch,
    region_loss,
    region_targets,
    train_clip,
)
from prumerge_cli.zoo.precision import autocast, native_bf16, resolve
from prumerge_cli.zoo.tokenizer import build_tokenizer
from prumerge_cli.zoo.world import QUESTION_TYPES, samples_of


def test_cell_pooling_finds_every_object_in_its_cell():
    for sample in samples_of("val", 0, 20):
        pixels = np.asarray(sample.image).astype(np.float32)
        colourful = torch.from_numpy(pixels.max(-1) - pixels.min(-1))  # grey clutter is near 0
        side = colourful.shape[0] // PATCH
        patches = colourful.reshape(side, PATCH, side, PATCH).mean((1, 3)).flatten()
        per_cell = cell_pooling() @ patches
        occupied = torch.tensor([t.cell for t in sample.scene])
        empty = torch.tensor([c for c in range(9) if c not in occupied])
        assert per_cell[occupied].min() > 1.5 * per_cell[empty].max(), (sample.caption, per_cell)


def test_region_targets_name_each_object():
    samples = samples_of("train", 0, 5)
    image, cell, phrase = region_targets(samples)
    things = [t for s in samples for t in s.scene]
    assert len(image) == len(things) == sum(len(s.caption.split(" and ")) for s in samples)
    for i, c, p, t in zip(image.tolist(), cell.tolist(), phrase.tolist(), things, strict=True):
        assert t in samples[i].scene and c == t.cell
        assert f"{PHRASES[p]} at" in samples[i].caption and PHRASES[p].endswith(t.name)


def test_region_loss_trains_the_patches():
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = CLIPModel(clip_config(len(tokenizer)))
    samples = samples_of("train", 0, 8)
    pixels, _ = pair_batch(samples, image_processor(), tokenizer)
    phrase_ids = caption_batch(tokenizer, list(PHRASES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        patches = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        phrases = F.normalize(model.get_text_features(**phrase_ids).pooler_output, dim=-1)
        loss = region_loss(model, patches, phrases, samples)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_clip_training_is_deterministic_given_a_seed():
    tokenizer = build_tokenizer()
    runs = [train_clip(tokenizer, steps=2, batch_size=4, seed=seed, precision="fp32") for seed in (0, 0, 1)]
    weights = [torch.cat([p.detach().flatten() for p in run.parameters()]) for run in runs]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_precision_is_bf16_only_where_native():
    assert resolve("auto") == ("bf16" if native_bf16() else "fp32")
    assert resolve("fp32") == "fp32" and resolve("bf16") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve("fp16")
    a = torch.ones(2, 2)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with autocast(precision):
            assert (a @ a).dtype == dtype


def test_model_card_fills_every_field():
    accuracy = {kind: 0.5 for kind in (*QUESTION_TYPES, "overall")} | {"color": 0.875}
    machine = {"minutes": 2.5, "seconds_per_step": 0.75, "cpu": cpu_name(), "native_bf16": native_bf16(),
               "threads": 2, "precision": "fp32"}  # fmt: skip
    records = {
        "clip": {**machine, "retrieval_top1": 0.9},
        "llava": {**machine, "vqa": accuracy, "questions": 60,
                  "token_choice": {"budget": 26, "of": 256, "oracle": 0.7, "random": 0.55, "positions": "original",
                                   "per_type": {"oracle": accuracy, "random": accuracy | {"count": 0.25}}},
                  "positions": {"prumerge": {"contiguous": 0.4, "original": 0.5}}},
    }  # fmt: skip
    card = model_card(Recipe(precision="fp32"), records)
    assert "| color | 87.5 |" in card and "| overall | 50.0 |" in card and "**90.0%**" in card
    assert "(60 test questions, greedy replies)" in card
    assert f"on {cpu_name()} (native bf16: {'yes' if native_bf16() else 'no'}, trained in fp32" in card
    assert "**70.0%**" in card and "(+15.0 points)" in card and "| prumerge | 40.0 | 50.0 |" in card
    assert "| oracle | 87.5 | 50.0 | 50.0 | 50.0 |" in card and "| random | 87.5 | 50.0 | 50.0 | 25.0 |" in card
    assert "{" not in card and "}" not in card
    assert "not built by this recipe yet" in model_card(Recipe(), {})
    assert "come from a run" not in card
    records["llava"]["recipe"] = {**Recipe(precision="fp32").llava(), "steps": 1200}
    shorter = model_card(Recipe(precision="fp32"), records)
    assert f"**The weights here come from a run with steps 1200 (recipe: {Recipe().llava_steps})**" in shorter
    records["llava"]["focus"] = {**Recipe().focus(), "steps": 100}
    records["llava"]["phase_minutes"] = {"llava": 2.0, "llava-focus": 0.5}
    phased = model_card(Recipe(precision="fp32"), records)
    assert f"focus steps 100 (recipe: {Recipe().focus_steps})" in phased
    assert "2.5 min of training: 2.0 (llava) + 0.5 (llava-focus) (0.75 s per step)" in phased


def test_token_subsets_keep_random_patches_at_their_positions():
    from prumerge_cli.zoo.llava_training import token_subsets

    features = torch.randn(64, 256, 8)
    out = token_subsets(features, 0.25, torch.Generator().manual_seed(0))
    again = token_subsets(features, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out.indices, again.indices) and out.span == 256
    reduced = out.lengths < 256
    assert 5 <= int(reduced.sum()) <= 28 and int(out.lengths[reduced].min()) >= 8
    assert int(out.lengths[reduced].max()) <= 64
    for b in range(64):
        n = int(out.lengths[b])
        kept = out.indices[b, :n]
        assert torch.equal(kept, kept.sort().values) and torch.equal(out.tokens[b, :n], features[b, kept])
    assert torch.equal(token_subsets(features, 0.0, torch.Generator()).tokens, features)


def test_token_subsets_tilt_between_background_and_objects():
    from prumerge_cli.zoo.llava_training import token_subsets

    features = torch.randn(64, 256, 4)
    cover = torch.zeros(64, 256)
    cover[:, :32] = 1.0  # an eighth of the patches are object patches

    def object_shares(bias: float, lean: float = 0.0) -> torch.Tensor:
        out = token_subsets(features, 1.0, torch.Generator().manual_seed(1), cover, bias, lean)
        kept = [out.indices[b, : int(out.lengths[b])] for b in range(64)]
        return torch.tensor([float((k < 32).float().mean()) for k in kept])

    uniform, tilted = object_shares(0.0), object_shares(4.0)
    assert abs(float(uniform.mean()) - 0.125) < 0.05 and float(uniform.max()) < 0.4
    assert float(tilted.max()) > 0.6 and float(tilted.min()) < 0.05
    assert torch.equal(tilted, object_shares(4.0))
    leaning = token_subsets(features, 1.0, torch.Generator().manual_seed(1), cover, 0.0, 12.0)
    for b in range(64):  # as many object patches as the subset holds: object-only up to 32 patches
        n = int(leaning.lengths[b])
        assert int((leaning.indices[b, :n] < 32).sum()) == min(n, 32)
