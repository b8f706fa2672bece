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


def write_llava_original(llava_dir, out, extra_state: dict, extra_config: dict):
    """The model in original-LLaVA layout (`pytorch_model.bin`, `llava_llama` config, no vision weights), and the
    CLIP directory its mm_vision_tower names."""
    model, tokenizer = load_llava(llava_dir)
    state = {**model.state_dict(), **extra_state}
    out.mkdir()
    torch.save({official_name(k): v for k, v in state.items() if official_name(k)}, out / "pytorch_model.bin")
    config = {**model.config.text_config.to_dict(), "model_type": "llava_llama",
              "architectures": ["LlavaLlamaForCausalLM"],
              "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": model.config.vision_config.hidden_size,
              "mm_vision_select_layer": model.config.vision_feature_layer, "mm_vision_select_feature": "patch",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", **extra_config}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(out)
    tower = CLIPVisionModel(model.config.vision_config)
    tower.load_state_dict(model.model.vision_tower.state_dict())
    tower.save_pretrained(out.parent / "clip")
    return out.parent / "clip"


def write_official(llava_dir, predictors: Predictors, out):
    """A Dynamic-LLaVA checkpoint as the official code saves it."""
    sparse = {"sparse_layer": 2, "d_model": 32, "nhead": 4, "dim_feedforward": 64, "num_layers": 2,
              "vision_keep_rate": 0.25, "output_text_keep_rate": 0.5, "output_text_len_for_training": 50,
              "mask_loss_weight": 100.0, "use_vision_predictor": True, "use_output_text_predictor": True,
              "use_instruct_predictor": False}  # fmt: skip
    weights = {f"predictors.{k}": v for k, v in predictors.state_dict().items()}
    return write_llava_original(llava_dir, out, weights, {"sparse_config": sparse})


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


def test_upstream_prumerge_lora_converts_to_a_finetuned_bundle(llava_deep_dir, image_paths, tmp_path, capsys):
    """A LoRA directory as LLaVA's `--lora_enable` training writes it (PEFT 0.4 names in adapter_model.bin, the
    projector in non_lora_trainables.bin) on an original-LLaVA base: the bundle gives the logits of the same
    adapters and projector applied directly."""
    from peft import get_peft_model_state_dict

    import prumerge_cli
    from prumerge_cli.finetune.bundle import load_finetuned_lm
    from prumerge_cli.finetune.lora import LoraSettings, attach_lora
    from prumerge_cli.lm.llava_lm import LlavaLm

    clip = write_llava_original(llava_deep_dir, tmp_path / "base", {}, {})
    model, tokenizer = load_llava(llava_deep_dir)
    peft_model = attach_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj")))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "multi_modal_projector" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    lora = tmp_path / "lora"
    lora.mkdir()
    old = lambda k: k.replace("model.language_model.", "model.")  # noqa: E731  PEFT 0.4 on the original layout
    torch.save({old(k): v for k, v in get_peft_model_state_dict(peft_model).items()}, lora / "adapter_model.bin")
    projector = {"base_model.model." + official_name(f"model.multi_modal_projector.{k}"): v
                 for k, v in model.model.multi_modal_projector.state_dict().items()}  # fmt: skip
    torch.save(projector, lora / "non_lora_trainables.bin")
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4,
        "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "base_model_name_or_path": "./checkpoints/llava-v1.5-7b"}))  # fmt: skip

    result = run_cli(capsys, "convert", lora, "--from", "prumerge-lora", "--base", tmp_path / "base",
                     "--vision-tower", clip, "--method", "prumerge+", "-o", tmp_path / "out")  # fmt: skip
    assert result.code == 0, result.err
    record = json.loads((tmp_path / "out" / "bundle" / "reducer.json").read_text())
    assert record["method"] == "prumerge+" and record["regime"] == "fine-tuned"
    assert record["positions"] == "contiguous"  # where upstream PruMerge puts the kept tokens
    tuned, encoder = load_finetuned_lm(tmp_path / "out" / "bundle"), prumerge_cli.load(tmp_path / "out" / "bundle")
    direct = LlavaLm(model.eval(), tokenizer)
    direct_encoder = ReducedVisionEncoder.from_pretrained(llava_deep_dir, "prumerge+", positions="contiguous")
    direct_encoder.projector = model.model.multi_modal_projector
    images = [open_image(p) for p in image_paths[:2]]
    texts = direct.encode(["what color is the object", "how many objects are there"])
    with torch.no_grad():
        ours = encoder.encode_images(images, project=True)
        theirs = direct_encoder.encode_images(images, project=True)
        torch.testing.assert_close(ours.tokens, theirs.tokens)
        got = tuned.logits(splice(tuned.embed, tuned.bos_id, ours, texts))
        want = direct.logits(splice(direct.embed, direct.bos_id, theirs, texts))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        base = LlavaLm.from_pretrained(tmp_path / "out" / "model")
        assert (base.logits(splice(base.embed, base.bos_id, ours, texts)) - want).abs().max() > 1e-3
