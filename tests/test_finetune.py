"""`prumerge compress --finetune`: LoRA on the LM and the projector trained with a reducer active, on a real
tiny LLaVA; exact resume, data parallel = one process, bundles that load, merge and answer."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from prumerge_cli.finetune.bundle import load_finetuned_lm
from prumerge_cli.finetune.compress import FinetuneJob, run_finetune
from prumerge_cli.finetune.lora import LoraSettings
from prumerge_cli.lm.llava_lm import LlavaLm
from prumerge_cli.lm.splice import splice
from prumerge_cli.training.loop import TrainOptions
from prumerge_cli.zoo.llava_json import write_llava_json

from .cli_helpers import run_cli
from .test_cli import current_umask
from .test_dynamic_training import torchrun

LORA = LoraSettings(rank=4, alpha=8, dropout=0.0)
TUNE_ARGS = ("--finetune", "--method", "prumerge", "--lora-rank", 4, "--lora-alpha", 8, "--lora-dropout", 0,
             "--lr", 1e-3, "--projector-lr", 1e-3)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = write_llava_json(tmp_path_factory.mktemp("tune") / "train", "train", 6)
    records = json.loads(data.read_text())
    records.append({"id": "text", "conversations": [{"from": "human", "value": "what color is red"},
                                                    {"from": "gpt", "value": "red"}]})  # fmt: skip
    data.write_text(json.dumps(records))
    return data, data.parent / "images"


def job(llava_deep_dir, world, output, steps=4, **options) -> FinetuneJob:
    data, images = world
    opts = TrainOptions(steps=steps, batch_size=2, lr=1e-3, projector_lr=1e-3, save_every=2, **options)
    return FinetuneJob(llava_deep_dir, "prumerge", data, images, output, opts, LORA)


def test_resume_reproduces_the_run_and_the_bundle_holds_adapters(llava_deep_dir, world, tmp_path):
    straight = run_finetune(job(llava_deep_dir, world, tmp_path / "straight"), Console(quiet=True))

    def stop_after_step_1(log):
        if log.step == 1:
            raise KeyboardInterrupt

    interrupted = job(llava_deep_dir, world, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_finetune(interrupted, Console(quiet=True), on_step=stop_after_step_1)
    assert not interrupted.output.exists()
    resumed = run_finetune(FinetuneJob(**{**vars(interrupted), "resume": True}), Console(quiet=True))
    assert [asdict(s) for s in resumed] == [asdict(s) for s in straight]
    assert straight[-1].loss < straight[0].loss
    bundle = tmp_path / "straight"
    record = json.loads((bundle / "reducer.json").read_text())
    assert record["regime"] == "fine-tuned" and record["method"] == "prumerge"
    assert record["finetune"]["lora"]["rank"] == 4 and record["finetune"]["text_only"] == 1
    a = load_file(bundle / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_B" in k and a[k].abs().max() > 0 for k in a)  # trained away from peft's zero init
    assert json.loads((bundle / "adapter" / "adapter_config.json").read_text())["r"] == 4
    usual = 0o666 & ~current_umask()  # not the private mode safetensors creates files with
    assert all(p.stat().st_mode & 0o777 == usual for p in bundle.rglob("*.safetensors"))


def test_a_finetuned_bundle_loads_merges_and_answers(llava_deep_dir, world, image_paths, tmp_path, capsys):
    import prumerge_cli
    from prumerge_cli.models.images import open_image

    data, images = world
    result = run_cli(capsys, "compress", llava_deep_dir, "-o", tmp_path / "ft", *TUNE_ARGS, "--data", data,
                     "--images", images, "--steps", 3, "--batch-size", 2)  # fmt: skip
    assert result.code == 0, result.err
    tuned = load_finetuned_lm(tmp_path / "ft")
    base = LlavaLm.from_pretrained(llava_deep_dir)
    encoder = prumerge_cli.load(tmp_path / "ft")  # with the trained projector
    assert not torch.equal(encoder.projector.linear_1.weight, base.model.model.multi_modal_projector.linear_1.weight)
    image = encoder.encode_images([open_image(p) for p in image_paths[:2]], project=True)
    texts = base.encode(["what color is the object", "how many objects are there"])
    batch = splice(tuned.embed, tuned.bos_id, image, texts)
    with torch.no_grad():
        logits = tuned.logits(batch)
        assert (logits - base.logits(batch)).abs().max() > 1e-4  # the adapters act

    merged = run_cli(capsys, "compress", tmp_path / "ft", "--merge-lora", "-o", tmp_path / "merged")
    assert merged.code == 0, merged.err
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(LlavaLm(plain, tuned.tokenizer).logits(batch), logits, rtol=1e-4, atol=1e-4)

    answer = run_cli(capsys, "generate", tmp_path / "ft", "--image", image_paths[0], "--prompt", "what color",
                     "--max-new-tokens", 3)  # fmt: skip
    assert answer.code == 0 and "visual tokens kept" in answer.out


def test_data_parallel_equals_one_process(llava_deep_dir, world, tmp_path, capsys):
    data, images = world
    args = ["compress", llava_deep_dir, *TUNE_ARGS, "--data", data, "--images", images, "--steps", 2]
    assert run_cli(capsys, *args, "-o", tmp_path / "one", "--batch-size", 4).code == 0
    proc = torchrun([*args, "-o", tmp_path / "ddp", "--batch-size", 2], 29536)
    assert "2 processes, DDP" in proc.stdout
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (("--method", "dynamic"), "training-free method"),
    (("--data", "missing.json"), "does not exist"),
    (("--data", "absent-image.json"), "missing or unreadable image"),
])  # fmt: skip
def test_bad_input_is_one_clean_line(llava_deep_dir, world, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    data, images = world
    record = {"image": "absent.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "absent-image.json").write_text(json.dumps([record]))
    result = run_cli(capsys, "compress", llava_deep_dir, "-o", tmp_path / "out", *TUNE_ARGS, "--data", data,
                     "--images", images, *extra)  # fmt: skip
    assert result.code == 2 and message in result.err and "Traceback" not in result.err
    assert not (tmp_path / "out").exists()


def test_resume_with_other_settings_and_lora_on_another_model_are_refused(llava_deep_dir, llava_dir, world, tmp_path,
                                                                        capsys):  # fmt: skip
    data, images = world
    args = ["compress", llava_deep_dir, "-o", tmp_path / "out", *TUNE_ARGS, "--data", data, "--images", images,
            "--steps", 3]  # fmt: skip
    assert run_cli(capsys, *args, "--stop-after", 1).code == 0
    changed = run_cli(capsys, *args, "--lora-rank", 8, "--resume")
    assert changed.code == 2 and "other settings" in changed.err and "lora" in changed.err
    moved = run_cli(capsys, "compress", llava_dir, *args[2:], "--resume")  # another base model, same checkpoint
    assert moved.code == 2 and "other settings" in moved.err and "model" in moved.err
    assert run_cli(capsys, *args, "--resume").code == 0
    other = run_cli(capsys, "generate", tmp_path / "out", "--model", llava_dir, "--image", next(images.glob("*.png")),
                    "--prompt", "what color")  # fmt: skip
    assert other.code == 2 and "Traceback" not in other.err


def test_export_and_bench_of_a_finetuned_bundle(llava_deep_dir, world, image_paths, tmp_path, capsys):
    """The ONNX export carries the trained projector; bench names the regime of each row."""
    import prumerge_cli
    from prumerge_cli.encoder import ReducedVisionEncoder
    from prumerge_cli.models.images import open_image, preprocess
    from prumerge_cli.runtime.ort import OrtEncoder

    data, images = world
    result = run_cli(capsys, "compress", llava_deep_dir, "-o", tmp_path / "ft", *TUNE_ARGS, "--data", data,
                     "--images", images, "--steps", 2, "--batch-size", 2)  # fmt: skip
    assert result.code == 0, result.err
    exported = run_cli(capsys, "export", tmp_path / "ft", "--onnx", "--with-projector", "-o", tmp_path / "onnx")
    assert exported.code == 0, exported.err
    tuned = prumerge_cli.load(tmp_path / "ft")
    base = ReducedVisionEncoder.from_pretrained(llava_deep_dir, "prumerge")
    pixels = preprocess(tuned.processor, [open_image(p) for p in image_paths[:2]])
    ort = OrtEncoder(tmp_path / "onnx")(pixels)
    torch.testing.assert_close(ort.tokens, tuned(pixels, project=True).tokens, rtol=1e-4, atol=1e-4)
    assert (ort.tokens - base(pixels, project=True).tokens).abs().max() > 1e-3

    bench = run_cli(capsys, "bench", llava_deep_dir, tmp_path / "ft", "--methods", "prumerge", "--synthetic", 2,
                    "--batch-sizes", 1, "--iters", 1, "--warmup", 0, "--backends", "torch",
                    "--json", tmp_path / "b.json")  # fmt: skip
    assert bench.code == 0, bench.err
    rows = json.loads((tmp_path / "b.json").read_text())["encoder"]
    assert {(r["variant"], r["regime"]) for r in rows} >= {("prumerge", "training-free"),
                                                            ("prumerge fine-tuned", "fine-tuned")}  # fmt: skip
    assert "prumerge fine-tuned" in bench.out


def test_the_template_is_read_from_the_checkpoint_chat_template():
    from prumerge_cli.errors import PrumergeError
    from prumerge_cli.training.conversations import resolve_template
    from prumerge_cli.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    assert resolve_template("auto", tokenizer) == "plain" and resolve_template("vicuna_v1", tokenizer) == "vicuna_v1"
    tokenizer.chat_template = (  # the layout of llava-hf/llava-1.5-7b-hf's template
        "{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    assert resolve_template("auto", tokenizer) == "vicuna_v1"
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>{% endfor %}"
    with pytest.raises(PrumergeError, match="neither plain nor vicuna_v1"):
        resolve_template("auto", tokenizer)


def test_bf16_holds_the_frozen_base_in_bf16_and_trains_fp32_adapters(llava_deep_dir, world, tmp_path):
    from prumerge_cli.finetune.lora import attach_lora, hold_frozen_lm_in

    model = LlavaForConditionalGeneration.from_pretrained(str(llava_deep_dir))
    attach_lora(model, LORA)
    hold_frozen_lm_in(model, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert dtypes["model.language_model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["lm_head.weight"] == torch.bfloat16
    assert dtypes["model.multi_modal_projector.linear_1.weight"] == torch.float32

    history = run_finetune(
        job(llava_deep_dir, world, tmp_path / "bf16", steps=2, precision="bf16"), Console(quiet=True)
    )
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h.loss)) for h in history)
    adapters = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapters.values())
    assert json.loads((tmp_path / "bf16" / "reducer.json").read_text())["finetune"]["precision"] == "bf16"
