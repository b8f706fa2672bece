"""`prumerge convert --from dynamic-llava`: a synthetic checkpoint written in the official layout (original-LLaVA
names, `pytorch_model.bin`, predictors under the official names, `sparse_config`, no vision weights) converts to
a bundle whose decisions and logits equal those of the same weights built directly."""

from __future__ import annotations

import json

import torch
from transformers import CLIPVisionModel

from prumerge_cli.dynamic import DynamicLlava, Predictors, SparseConfig
from prumerge_cli.dynamic.bundle import load_dynamic, load_llava
from prumerge_cli.encoder import ReducedVisionEncoder
from prumerge_cli.lm.splice import splice
from prumerge_cli.models.images import open_image

from .cli_helpers import run_cli

CONFIG = SparseConfig(d_model=32, nhead=4, dim_feedforward=64, num_layers=2, text_hidden=(32, 16, 8),
                      vision_keep_rate=0.25)  # fmt: skip
OFFICIAL_BLOCK = {"qkv": "attn.qkv", "proj": "attn.proj", "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}


def official_name(key: str) -> str | None:
    """The official name of one of our weights (None: the vision tower, which LLaVA-1.5 checkpoints leave out)."""
    if key.startswith("model.vision_tower."):
        return None
    if key.startswith("model.multi_modal_projector."):
        return key.replace("multi_modal_projector.linear_1", "mm_projector.0").replace(
            "multi_modal_projector.linear_2", "mm_projector.2")  # fmt: skip
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key.startswith("predictors.text.mlp."):
        return "model.output_text_score_predictor.output_mlp." + key.removeprefix("predictors.text.mlp.")
    if key.startswith("predictors.vision."):
        rest = key.removeprefix("predictors.vision.")
        rest = (
            rest.replace("down.", "down_mlp.", 1).replace("head.", "output_mlp.", 1).replace("blocks.", "transformer.")
        )
        for ours, theirs in OFFICIAL_BLOCK.items():
            rest = rest.replace(f".{ours}.", f".{theirs}.")
        return "model.image_score_predictor." + rest
    return key


def write_official(llava_dir, predictors: Predictors, out):
    """The checkpoint as the official code saves it, and the CLIP directory its mm_vision_tower names."""
    model, tokenizer = load_llava(llava_dir)
    state = {**model.state_dict(), **{f"predictors.{k}": v for k, v in predictors.state_dict().items()}}
    out.mkdir()
    torch.save({official_name(k): v for k, v in state.items() if official_name(k)}, out / "pytorch_model.bin")
    text = model.config.text_config.to_dict()
    sparse = {"sparse_layer": 2, "d_model": 32, "nhead": 4, "dim_feedforward": 64, "num_layers": 2,
              "vision_keep_rate": 0.25, "output_text_keep_rate": 0.5, "output_text_len_for_training": 50,
              "mask_loss_weight": 100.0, "use_vision_predictor": True, "use_output_text_predictor": True,
              "use_instruct_predictor": False}  # fmt: skip
    config = {**text, "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": model.config.vision_config.hidden_size,
              "mm_vision_select_layer": model.config.vision_feature_layer, "mm_vision_select_feature": "patch",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "sparse_config": sparse}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(out)
    tower = CLIPVisionModel(model.config.vision_config)
    tower.load_state_dict(model.model.vision_tower.state_dict())
    tower.save_pretrained(out.parent / "clip")
    return out.parent / "clip"


def test_official_dynamic_llava_checkpoint_converts_exactly(llava_deep_dir, image_paths, tmp_path, capsys):
    predictors = Predictors(32, CONFIG, seed=3)
    with torch.no_grad():  # decisive output logits, as a trained predictor's are
        predictors.text.mlp[-1].weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(3))
    clip = write_official(llava_deep_dir, predictors, tmp_path / "official")
    result = run_cli(capsys, "convert", tmp_path / "official", "--vision-tower", clip, "-o", tmp_path / "out")
    assert result.code == 0, result.err
    converted, encoder = load_dynamic(tmp_path / "out" / "bundle")
    assert converted.config == CONFIG and converted.vision

    model, tokenizer = load_llava(llava_deep_dir)
    direct = DynamicLlava(model, tokenizer, predictors.eval())
    direct_encoder = ReducedVisionEncoder.from_pretrained(llava_deep_dir, "none")
    images = [open_image(p) for p in image_paths[:2]]
    texts = direct.lm.encode(["what color is the object at northwest", "how many objects are there"])
    theirs = converted.generate(encoder.encode_images(images, project=True), texts, 12)
    ours = direct.generate(direct_encoder.encode_images(images, project=True), texts, 12)
    assert theirs.tokens.tolist() == ours.tokens.tolist() and theirs.kept.tolist() == ours.kept.tolist()
    assert 0 < int(ours.kept.sum()) < ours.kept.numel()  # some generated tokens dropped, some kept
    image = direct_encoder.encode_images(images, project=True)
    batch = splice(direct.lm.embed, direct.lm.bos_id, image, texts)
    reference = direct.prefill(batch, image.lengths)
    got = converted.prefill(batch, image.lengths)
    assert torch.equal(got.keep, reference.keep)
    torch.testing.assert_close(got.logits, reference.logits, rtol=1e-5, atol=1e-5)


def test_convert_refuses_what_it_cannot_read(llava_deep_dir, tmp_path, capsys):
    result = run_cli(capsys, "convert", llava_deep_dir, "--vision-tower", llava_deep_dir, "-o", tmp_path / "o")
    assert result.code == 2 and "not a Dynamic-LLaVA checkpoint" in result.err and not (tmp_path / "o").exists()


def test_image_token_added_with_mean_rows():
    """A Vicuna-style tokenizer without `<image>` gets it; embeddings and head grow to a multiple of 64 with the
    mean row, and the old rows stay as they were."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from prumerge_cli.convert.llava_original import add_image_token

    words = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "b"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="<unk>")),
                                        unk_token="<unk>", bos_token="<s>", eos_token="</s>")  # fmt: skip
    rows = torch.randn(5, 4)
    state = {"model.language_model.embed_tokens.weight": rows.clone(), "lm_head.weight": rows.clone()}
    token = add_image_token(tokenizer, state)
    assert token == 5 and tokenizer.convert_ids_to_tokens(5) == "<image>"
    for grown in state.values():
        assert grown.shape == (64, 4) and torch.equal(grown[:5], rows)
        torch.testing.assert_close(grown[5:], rows.mean(0).expand(59, 4))
