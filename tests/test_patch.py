"""`prumerge_cli.patch` on a stock `LlavaForConditionalGeneration` (the embedded one, with a `LlavaProcessor`):
method none is the unpatched model exactly; a bundle's patched greedy output equals `prumerge generate`'s;
batches of images keeping different counts work; `unpatch` restores the model."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

import prumerge_cli
from prumerge_cli.generate import Asker, Decoding
from prumerge_cli.zoo import LLAVA_DIR
from prumerge_cli.zoo.world import samples_of

from .tiny_models import VISION


@pytest.fixture(scope="module")
def stock():
    model = LlavaForConditionalGeneration.from_pretrained(str(LLAVA_DIR), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(LLAVA_DIR), patch_size=14, num_additional_image_tokens=1,
                                              vision_feature_select_strategy="default")  # fmt: skip
    processor.tokenizer.padding_side = "left"
    return model, processor


def ask(model, processor, images, questions, new_tokens=4):
    bos = processor.tokenizer.bos_token  # the embedded tokenizer adds no <s> of its own; LLaVA-1.5's does
    inputs = processor(images=images, text=[f"{bos}<image>{q}" for q in questions], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return out, inputs["input_ids"].shape[1]


def test_method_none_is_the_unpatched_model_exactly(stock):
    model, processor = stock
    samples = samples_of("test", 0, 2)
    images, questions = [s.image for s in samples], [s.qas[0].question for s in samples]
    plain, _ = ask(model, processor, images, questions)
    prumerge_cli.patch(model, "none")
    try:
        assert type(model).__name__ == "ReducedLlava"
        patched, _ = ask(model, processor, images, questions)
    finally:
        prumerge_cli.unpatch(model)
    assert type(model) is LlavaForConditionalGeneration and not hasattr(model, "_prumerge_encoder")
    assert torch.equal(plain, patched)


@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_patched_greedy_equals_prumerge_generate_over_a_batch_of_different_counts(stock, tmp_path, positions):
    model, processor = stock
    bundle = tmp_path / "bundle"
    prumerge_cli.ReducedVisionEncoder.from_pretrained(LLAVA_DIR, "prumerge", positions=positions).save(bundle)
    samples = samples_of("test", 3, 3)
    images, questions = [s.image for s in samples], [s.qas[1].question for s in samples]
    asker = Asker(bundle)
    expected = asker.ask(images, questions, Decoding(max_new_tokens=4))
    assert len({a.visual_tokens for a in expected}) > 1  # the images keep different numbers of tokens
    prumerge_cli.patch(model, bundle)
    try:
        out, prompt_length = ask(model, processor, images, questions)
    finally:
        prumerge_cli.unpatch(model)
    for row, answer in zip(out[:, prompt_length:].tolist(), expected, strict=True):
        assert asker.lm.until_eos(row) == answer.token_ids


def test_patch_refuses_what_it_cannot_reduce(stock, tmp_path):
    model, _ = stock
    tiny = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=112, **VISION).to_dict(),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                vocab_size=128).to_dict(),
        image_grid_pinpoints=[[112, 112]],
        vision_feature_layer=[-2, -1],
    )  # fmt: skip
    with pytest.raises(prumerge_cli.PrumergeError, match="a list of vision feature layers is not supported"):
        prumerge_cli.patch(LlavaNextForConditionalGeneration(tiny), "prumerge")
    with pytest.raises(prumerge_cli.PrumergeError, match="unknown method 'bogus'"):
        prumerge_cli.patch(model, "bogus")
    with pytest.raises(prumerge_cli.PrumergeError, match="positions must be one of"):
        prumerge_cli.patch(model, "prumerge", positions="sideways")
    assert type(model) is LlavaForConditionalGeneration
