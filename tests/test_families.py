"""The families beyond LLaVA-1.5 (LLaVA-NeXT, LLaVA-OneVision, InternVL, Gemma 3) on tiny random checkpoints
saved and loaded as a user's: `patch` with method none is the stock `generate` token for token; a reduced batch
equals its rows alone; the LM receives the kept tokens plus the newline rows; each family's score equals a plain
reference from the tower's eager attention weights."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText

import prumerge_cli
from prumerge_cli.errors import PrumergeError
from prumerge_cli.families.registry import adapter_for
from prumerge_cli.models.tower import VisionTower
from prumerge_cli.zoo.families import FAMILIES, IMAGE_TOKEN, build_family, save_family

NEW_TOKENS = 6
IMAGE_KEYS = ("image_sizes", "image_grid_thw")
"""The image inputs beside pixel values that a family's processor gives."""


def images(seed: int = 0) -> list[Image.Image]:
    """Two images of different sizes: a wide one (two grid tiles) and a tall one (four or six)."""
    rng = np.random.default_rng(seed)
    sizes = [(90, 200), (330, 220)]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in sizes]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, (ids != 0).long()


def prompts(runs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`<s>`, an image's placeholders (one run per image of a row), then a few words of different lengths."""
    return left_padded([[2, *(IMAGE_TOKEN for n in row for _ in range(n)), *range(10, 12 + i)]
                        for i, row in enumerate(runs)])  # fmt: skip


def inputs_of(name: str, model, processor) -> dict:
    """A batch of two prompts, one image each, of different sizes where the family tiles them."""
    pixels = processor(images(), return_tensors="pt")
    with torch.no_grad():
        sizes = {k: pixels[k] for k in IMAGE_KEYS if k in pixels}
        features = model.model.get_image_features(pixel_values=pixels["pixel_values"], **sizes).pooler_output
    if name in ("llava_next", "llava_onevision"):
        ids, mask = prompts([[len(f)] for f in features])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels["pixel_values"],
                    image_sizes=pixels["image_sizes"])  # fmt: skip
    if name.startswith("qwen"):  # <s>, vision start, the image's merged tokens, vision end, words
        ids, mask = left_padded(
            [[2, 5, *[IMAGE_TOKEN] * len(f), 6, *range(10, 12 + i)] for i, f in enumerate(features)]
        )
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels["pixel_values"],
                    image_grid_thw=pixels["image_grid_thw"], mm_token_type_ids=(ids == IMAGE_TOKEN).int())  # fmt: skip
    per_image = features.shape[1]
    if name == "internvl":  # tiles of the first image, then of the second
        tiles = pixels["num_patches"].tolist()
        ids, mask = prompts([[per_image * tiles[0]], [per_image * tiles[1]]])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels["pixel_values"], tiles=tiles)
    boi, eoi = model.config.boi_token_index, model.config.eoi_token_index
    ids, mask = left_padded(
        [[2, boi, *[IMAGE_TOKEN] * per_image, eoi, 10, 11], [2, boi, *[IMAGE_TOKEN] * per_image, eoi, 12]]
    )
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=(ids == IMAGE_TOKEN).long(),
                pixel_values=pixels["pixel_values"])  # fmt: skip


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = save_family(request.param, tmp_path_factory.mktemp(request.param) / "model", "small")
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    inputs = inputs_of(request.param, model, AutoImageProcessor.from_pretrained(str(path), backend="pil"))
    tiles = inputs.pop("tiles", None)
    return request.param, model, inputs, tiles


def generate(model, inputs: dict) -> torch.Tensor:
    """Greedy answers of `NEW_TOKENS` tokens."""
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


def row(inputs: dict, b: int, name: str, tiles: list[int] | None) -> dict:
    """Prompt b of a batch alone, its padding dropped."""
    keep = inputs["attention_mask"][b].bool()
    texts = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
    out = {k: v[b : b + 1][:, keep] for k, v in inputs.items() if k in texts}
    if name == "internvl":
        assert tiles is not None
        first = sum(tiles[:b])
        out["pixel_values"] = inputs["pixel_values"][first : first + tiles[b]]
    elif name.startswith("qwen"):  # patches of every image in a row
        counts = inputs["image_grid_thw"].prod(-1).tolist()
        out["pixel_values"] = inputs["pixel_values"][sum(counts[:b]) : sum(counts[: b + 1])]
    else:
        out["pixel_values"] = inputs["pixel_values"][b : b + 1]
    for key in IMAGE_KEYS:
        if key in inputs:
            out[key] = inputs[key][b : b + 1]
    return out


@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_method_none_is_the_stock_generate_token_for_token(family, positions):
    name, model, inputs, _ = family
    if name.startswith("qwen") and positions == "contiguous":  # M-RoPE: the 3-D positions are kept, always
        with pytest.raises(PrumergeError, match="positions must be original"):
            prumerge_cli.patch(model, "none", positions=positions)
        return
    stock = generate(model, inputs)
    prumerge_cli.patch(model, "none", positions=positions)
    try:
        assert type(model).__name__.startswith("Reduced")
        patched = generate(model, inputs)
    finally:
        prumerge_cli.unpatch(model)
    assert not type(model).__name__.startswith("Reduced") and not hasattr(model, "_prumerge_adapter")
    assert torch.equal(stock, patched)


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_a_reduced_batch_equals_its_rows_alone(family, method):
    name, model, inputs, tiles = family
    prumerge_cli.patch(model, method, positions="original")
    try:
        batch = generate(model, inputs)
        alone = [generate(model, row(inputs, b, name, tiles)) for b in range(2)]
        kept = [
            len(i.tokens)
            for i in model.reduced_images(
                inputs["input_ids"], inputs["pixel_values"], {k: v for k, v in inputs.items() if k in IMAGE_KEYS}
            )
        ]
    finally:
        prumerge_cli.unpatch(model)
    for b in range(2):
        assert torch.equal(batch[b, -NEW_TOKENS:], alone[b][0, -NEW_TOKENS:])
    stock_counts = (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist()
    if method == "prumerge":  # PruMerge+'s samples can keep a 64-patch tile whole, and add its extra token
        assert all(k < n for k, n in zip(kept, stock_counts, strict=True)), (kept, stock_counts)


def test_the_lm_receives_the_kept_tokens_plus_a_newline_per_row_that_keeps_one(family):
    name, model, inputs, tiles = family
    prumerge_cli.patch(model, "prumerge", merge=False)  # no merged extra token: every token is a cell or a newline
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        for b in range(2):
            one = row(inputs, b, name, tiles)
            extra = {k: v for k, v in one.items() if k in IMAGE_KEYS}
            image = model.reduced_images(one["input_ids"], one["pixel_values"], dict(extra))[0]
            seen.clear()
            generate(model, one)
            text = int((one["input_ids"] != IMAGE_TOKEN).sum())
            assert seen[0] == text + len(image.tokens)
            newline = getattr(model.model, "image_newline", None)
            is_newline = torch.zeros(len(image.tokens), dtype=torch.bool)
            if newline is not None:
                is_newline = (image.tokens == newline).all(-1)
                layout = model._prumerge_adapter.layouts(one["input_ids"], one["pixel_values"], dict(extra), True)[0]
                base = layout.tiles[0].tokens.shape[0]
                width = int(layout.newline_places[0]) - base + 1  # a grid row and its newline
                cells = image.places[~is_newline]
                rows = torch.unique((cells[cells >= base] - base) // width)
                assert int(is_newline.sum()) == len(rows) > 0
            assert int((~is_newline).sum()) == sum(image.kept_per_tile)
    finally:
        hook.remove()
        prumerge_cli.unpatch(model)


def eager_received(model, name: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """The reference: the score layer's eager attention weights averaged over heads and queries, per LM token."""
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(pixel_values=pixel_values, output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    received = out.attentions[-1].mean(dim=(1, 2))
    if name == "internvl":  # drop [CLS]; a token is the mean of its 2x2 patches
        grid = received[:, 1:].reshape(-1, 4, 2, 4, 2)
        return grid.mean(dim=(2, 4)).flatten(1)
    if name == "gemma3":  # the mean over each 4x4 pooling window
        return received.reshape(-1, 4, 4, 4, 4).mean(dim=(2, 4)).flatten(1)
    return received


def qwen_reference(model, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The last vision block's eager attention weights (the library's eager path on the block's own q and k),
    averaged over heads and queries per attention span and over each 2x2 merge group, put in raster order by
    matching the merger's output on the block's output against the tower's (raster) output."""
    host = sys.modules[type(model.model.visual).__module__]  # the model's own rotary and eager attention
    rotary, eager_attention_forward = host.apply_rotary_pos_emb_vision, host.eager_attention_forward
    visual = model.model.visual
    block, seen = visual.blocks[-1], {}
    hooks = [block.register_forward_pre_hook(lambda m, a, kw: seen.update(h=a[0], kw=kw), with_kwargs=True),
             block.register_forward_hook(lambda m, a, out: seen.update(out=out))]  # fmt: skip
    with torch.no_grad():
        raster = visual(pixel_values, grid_thw=grid).pooler_output
        for hook in hooks:
            hook.remove()
        attn = block.attn
        q, k, v = attn.qkv(block.norm1(seen["h"])).reshape(len(seen["h"]), 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k = rotary(q, k, *seen["kw"]["position_embeddings"])
        bounds = seen["kw"]["cu_seqlens"].tolist()
        received = []
        for start, end in itertools.pairwise(bounds):
            part = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]
            _, weights = eager_attention_forward(attn, *part, attention_mask=None, scaling=attn.scaling)
            received.append(weights.mean(dim=(1, 2))[0])
        groups = torch.cat(received).view(-1, 4).mean(-1)
        windowed = visual.merger(seen["out"])
    order = [int((windowed - r).abs().sum(-1).argmin()) for r in raster]
    return groups[order]


def test_each_family_s_score_equals_a_plain_reference(family):
    name, model, inputs, tiles = family
    adapter = adapter_for(model)
    extra = {k: v for k, v in inputs.items() if k in IMAGE_KEYS}
    layouts = adapter.layouts(inputs["input_ids"], inputs["pixel_values"], extra, True)
    if name == "llava_next":  # CLIP: PruMerge's [CLS] row, as LLaVA-1.5's tower computes it
        tiles = inputs["pixel_values"][0, :1]
        tower = VisionTower(model.model.vision_tower, "clip", model.config.vision_feature_layer)
        expected = tower(tiles).scores
        torch.testing.assert_close(layouts[0].tiles[0].scores[None], expected, rtol=1e-4, atol=1e-6)
        return
    if name.startswith("qwen"):
        expected = qwen_reference(model, inputs["pixel_values"], inputs["image_grid_thw"])
        found = torch.cat([layout.tiles[0].scores for layout in layouts])
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-6)
        return
    pixels = inputs["pixel_values"][0, :1] if name == "llava_onevision" else inputs["pixel_values"][:1]
    expected = eager_received(model, name, pixels)
    torch.testing.assert_close(layouts[0].tiles[0].scores[None], expected, rtol=1e-4, atol=1e-6)


def test_scope_image_reduces_once_over_the_tiles_and_pool_refuses_it(family):
    _, model, inputs, _ = family
    adapter = adapter_for(model)
    extra = {k: v for k, v in inputs.items() if k in IMAGE_KEYS}
    layouts = adapter.layouts(inputs["input_ids"], inputs["pixel_values"], extra, True)
    from prumerge_cli.families.layout import reduce_image
    from prumerge_cli.reducers import build_reducer

    once = reduce_image(layouts[0], build_reducer("prumerge"), "image")
    assert len(once.kept_per_tile) == 1
    if len(layouts[0].tiles) > 1:
        with pytest.raises(PrumergeError, match="scope=image"):
            reduce_image(layouts[0], build_reducer("pool"), "image")


def test_onevision_s_downscaled_grid_is_one_tile_and_none_is_still_stock():
    model, processor = build_family("llava_onevision", "small", max_tiles=1)
    inputs = inputs_of("llava_onevision", model, processor)
    layouts = adapter_for(model).layouts(inputs["input_ids"], inputs["pixel_values"],
                                         {"image_sizes": inputs["image_sizes"]}, True)  # fmt: skip
    assert [len(layout.tiles) for layout in layouts] == [2, 2]  # the base, and the downscaled grid
    stock = generate(model, inputs)
    prumerge_cli.patch(model, "none", positions="original")
    try:
        assert torch.equal(stock, generate(model, inputs))
        prumerge_cli.patch(model, "prumerge")
        sizes = {"image_sizes": inputs["image_sizes"]}
        reduced = model.reduced_images(inputs["input_ids"], inputs["pixel_values"], sizes)
    finally:
        prumerge_cli.unpatch(model)
    assert all(len(image.kept_per_tile) == 2 for image in reduced)


def test_patch_refuses_a_class_it_cannot_map_in_one_line():
    with pytest.raises(PrumergeError, match=r"patch takes .*LlavaNextForConditionalGeneration.*; not Linear"):
        prumerge_cli.patch(torch.nn.Linear(2, 2), "prumerge")


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def qwen(request, tmp_path_factory):
    path = save_family(request.param, tmp_path_factory.mktemp(request.param) / "model", "small")
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoImageProcessor.from_pretrained(str(path), backend="pil")


def positions_seen(model, inputs: dict) -> list[torch.Tensor]:
    """The position ids the LM receives at prefill and at each decoding step."""
    seen: list[torch.Tensor] = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    try:
        generate(model, inputs)
    finally:
        hook.remove()
    return seen


def test_qwen_kept_tokens_keep_their_3d_positions_and_the_text_follows_on(qwen):
    model, processor = qwen
    inputs = inputs_of("qwen", model, processor)
    stock = positions_seen(model, inputs)
    prumerge_cli.patch(model, "prumerge")
    try:
        images = model.reduced_images(inputs["input_ids"], inputs["pixel_values"],
                                      {"image_grid_thw": inputs["image_grid_thw"]})  # fmt: skip
        reduced = positions_seen(model, inputs)
    finally:
        prumerge_cli.unpatch(model)
    assert all(len(i.tokens) < i.span for i in images)
    for b, image in enumerate(images):
        ids, keep = inputs["input_ids"][b].tolist(), inputs["attention_mask"][b].bool()
        start = ids.index(IMAGE_TOKEN)
        text = [i for i in range(len(ids)) if keep[i] and ids[i] != IMAGE_TOKEN]
        columns = sorted([i for i in text if i < start] + (start + image.places.clamp(max=image.span - 1)).tolist()
                         + [i for i in text if i > start])  # fmt: skip
        width = len(columns)
        assert torch.equal(reduced[0][:, b, -width:], stock[0][:, b, columns])
        for step in range(1, NEW_TOKENS):  # decoding goes on from the same place as the stock model's
            assert torch.equal(reduced[step][:, b], stock[step][:, b])


def test_qwen_two_images_in_one_prompt(qwen):
    model, processor = qwen
    pixels = processor(images(), return_tensors="pt")
    counts = [
        len(f) for f in model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output
    ]
    row = [2, 5, *[IMAGE_TOKEN] * counts[0], 6, 10, 5, *[IMAGE_TOKEN] * counts[1], 6, 11]
    ids = torch.tensor([row])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels["pixel_values"],
                  image_grid_thw=pixels["image_grid_thw"], mm_token_type_ids=(ids == IMAGE_TOKEN).int())  # fmt: skip
    stock = generate(model, inputs)
    prumerge_cli.patch(model, "none")
    try:
        assert torch.equal(generate(model, inputs), stock)
        prumerge_cli.patch(model, "prumerge")
        generate(model, inputs)
        kept = model._prumerge_counts
    finally:
        prumerge_cli.unpatch(model)
    assert len(kept) == 2 and all(k < n for k, n in zip(kept, counts, strict=True))


def test_qwen_video_is_refused_in_one_line(qwen):
    model, _ = qwen
    prumerge_cli.patch(model, "prumerge")
    try:
        with pytest.raises(PrumergeError, match="video inputs are not reduced"):
            model.generate(input_ids=torch.tensor([[2, 7]]), pixel_values_videos=torch.zeros(4, 1176))
    finally:
        prumerge_cli.unpatch(model)
