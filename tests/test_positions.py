"""`positions=contiguous|original`: where the LM places reduced visual tokens, honoured by every path to the LM."""

from __future__ import annotations

import json

import pytest
import torch

from prumerge_cli.bundle import load
from prumerge_cli.dynamic import DynamicLlava
from prumerge_cli.encoder import ReducedVisionEncoder
from prumerge_cli.exporters.onnx_export import OnnxOptions, export_onnx
from prumerge_cli.lm.llava_lm import LlavaLm
from prumerge_cli.lm.positions import row_positions
from prumerge_cli.lm.splice import splice
from prumerge_cli.models.images import open_image
from prumerge_cli.reducers import EXTRA_INDEX
from prumerge_cli.runtime.ort import OrtEncoder

from .cli_helpers import run_cli
from .test_dynamic import mixed_predictors


def test_row_positions():
    indices = torch.tensor([5, 2, EXTRA_INDEX])
    assert row_positions(1, indices, 3, None).tolist() == list(range(7))
    # <s> at 0, patches 5 and 2 at 1 + patch, the extra token at the last patch's place, text after all 10 patches
    assert row_positions(1, indices, 3, 10).tolist() == [0, 6, 3, 10, 11, 12, 13]
    assert row_positions(3, torch.tensor([0]), 1, 4).tolist() == [0, 1, 2, 3, 7]  # a template prefix of two


@pytest.fixture(scope="module")
def lm(llava_deep_dir):
    return LlavaLm.from_pretrained(llava_deep_dir)


@pytest.fixture(scope="module")
def images(image_paths):
    return [open_image(p) for p in image_paths[:3]]


def reduced(model_dir, images, positions: str, method: str = "prumerge"):
    encoder = ReducedVisionEncoder.from_pretrained(model_dir, method, positions=positions)
    return encoder.encode_images(images, project=True)


def test_every_token_at_original_positions_is_the_unreduced_model(llava_deep_dir, lm, images):
    texts = lm.encode(["what color is the object at northwest"] * 3)
    every = splice(lm.embed, lm.bos_id, reduced(llava_deep_dir, images, "original", "none"), texts)
    plain = splice(lm.embed, lm.bos_id, reduced(llava_deep_dir, images, "contiguous", "none"), texts)
    assert torch.equal(every.position_ids, plain.position_ids)


def test_original_positions_change_the_answer_and_follow_the_patches(llava_deep_dir, lm, images):
    texts = lm.encode(["what color is the object at northwest", "how many objects are there", "describe the image ."])
    kept = reduced(llava_deep_dir, images, "original")
    batch = splice(lm.embed, lm.bos_id, kept, texts)
    for b, text in enumerate(texts):
        n = int(kept.lengths[b])
        patches = kept.indices[b, :n]
        expected = torch.where(patches == EXTRA_INDEX, 63, patches) + 1
        assert batch.position_ids[b, 1 : 1 + n].tolist() == expected.tolist()
        assert int(batch.position_ids[b, batch.last[b]]) == 64 + len(text)  # the text after the full 64-patch span
    contiguous = splice(lm.embed, lm.bos_id, reduced(llava_deep_dir, images, "contiguous"), texts)
    assert not torch.allclose(lm.next_token_logits(batch), lm.next_token_logits(contiguous))


def test_cached_generation_continues_after_the_last_position(llava_deep_dir, lm, images):
    """Greedy decoding with the KV cache equals re-running the whole sequence at every step."""
    kept = reduced(llava_deep_dir, images, "original")
    texts = lm.encode(["describe the image ."] * 3)
    cached = lm.greedy(splice(lm.embed, lm.bos_id, kept, texts), 5)
    rows = [list(t) for t in texts]
    for _ in range(5):
        logits = lm.next_token_logits(splice(lm.embed, lm.bos_id, kept, rows))
        for r, token in zip(rows, logits.argmax(-1).tolist(), strict=True):
            r.append(token)
    assert cached == [lm.until_eos(r[len(t) :]) for r, t in zip(rows, texts, strict=True)]


def test_dynamic_llava_on_prumerge_tokens_at_original_positions(llava_deep_dir, lm, images):
    dynamic = DynamicLlava(lm.model, lm.tokenizer, mixed_predictors(32), vision=False)
    kept = reduced(llava_deep_dir, images, "original")
    texts = lm.encode(["describe the image ."] * 3)
    cached = dynamic.generate(kept, texts, 8, use_cache=True)
    uncached = dynamic.generate(kept, texts, 8, use_cache=False)
    assert cached.tokens.tolist() == uncached.tokens.tolist()
    assert cached.kept.tolist() == uncached.kept.tolist()


def test_bundle_and_onnx_export_keep_the_setting(capsys, llava_deep_dir, images, tmp_path):
    bundle = tmp_path / "bundle"
    result = run_cli(capsys, "compress", llava_deep_dir, "-o", bundle, "--positions", "original")
    assert result.code == 0, result.err
    assert json.loads((bundle / "reducer.json").read_text())["positions"] == "original"
    encoder = load(bundle)
    assert encoder.positions == "original"
    export_onnx(encoder, tmp_path / "onnx", OnnxOptions(with_projector=True))
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["positions"] == "original"
    pixels = encoder.processor(images=images, return_tensors="pt")["pixel_values"]
    assert OrtEncoder(tmp_path / "onnx")(pixels).span == 64 == encoder(pixels).span


def test_unknown_positions_is_one_line_and_writes_nothing(capsys, llava_deep_dir, tmp_path):
    result = run_cli(capsys, "compress", llava_deep_dir, "-o", tmp_path / "b", "--positions", "diagonal")
    assert result.code == 2
    assert "positions must be one of contiguous, original" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
