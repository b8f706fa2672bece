"""Training the Dynamic-LLaVA predictors: the compress command, exact resume, distillation, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from prumerge_cli.dynamic.bundle import load_dynamic
from prumerge_cli.dynamic.compress import DynamicJob, run_dynamic
from prumerge_cli.dynamic.config import SparseConfig
from prumerge_cli.training.loop import TrainOptions
from prumerge_cli.zoo.llava_json import write_llava_json

from .cli_helpers import run_cli
from .tiny_models import altered_copy

SMALL = SparseConfig(d_model=32, nhead=4, dim_feedforward=64, num_layers=1, text_hidden=(32, 16, 8),
                     output_len_for_training=2)  # fmt: skip
DYNAMIC_ARGS = ("--method", "dynamic", "--predictor-width", 32, "--predictor-heads", 4, "--predictor-blocks", 1,
                "--output-min-len", 2, "--batch-size", 2, "--lr", 1e-3)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = write_llava_json(tmp_path_factory.mktemp("world") / "train", "train", 6)
    return data, data.parent / "images"


def job(llava_deep_dir, world, output, steps=6, lr=1e-3, **options) -> DynamicJob:
    data, images = world
    opts = TrainOptions(steps=steps, batch_size=2, lr=lr, save_every=2, **options)
    return DynamicJob(llava_deep_dir, data, images, output, SMALL, opts)


class Interrupt(Exception):
    """Stands for Ctrl-C in the middle of a run."""


def test_resume_reproduces_the_uninterrupted_run(llava_deep_dir, world, tmp_path):
    straight = run_dynamic(job(llava_deep_dir, world, tmp_path / "straight"), Console(quiet=True))

    def stop_after_step_3(log):
        if log.step == 3:
            raise KeyboardInterrupt

    interrupted = job(llava_deep_dir, world, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_dynamic(interrupted, Console(quiet=True), on_step=stop_after_step_3)
    assert not interrupted.output.exists() and interrupted.checkpoint_dir.is_dir()  # no half-written bundle
    resumed = run_dynamic(DynamicJob(**{**vars(interrupted), "resume": True}), Console(quiet=True))
    assert [asdict(s) for s in resumed] == [asdict(s) for s in straight]  # the same loss curve, bit for bit
    a, b = (
        load_file(tmp_path / "straight" / "predictors.safetensors"),
        load_file(tmp_path / "resumed" / "predictors.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not interrupted.checkpoint_dir.exists()  # cleaned up once the bundle is written


def test_training_moves_the_keep_ratio_and_bundle_loads(llava_deep_dir, world, tmp_path):
    """The per-batch keep rate is noisy (0.40-0.61 over 12 steps at lr 1e-3); at lr 3e-2 it falls from 0.56 to
    about 0.1 within 12 steps."""
    history = run_dynamic(job(llava_deep_dir, world, tmp_path / "b", steps=12, lr=3e-2), Console(quiet=True))
    assert history[-1].metrics["image_keep"] < history[0].metrics["image_keep"] - 0.2  # pushed towards 0.2 from ~0.5
    dynamic, _encoder = load_dynamic(tmp_path / "b")
    assert dynamic.vision and dynamic.config == SMALL
    trained = load_file(tmp_path / "b" / "predictors.safetensors")
    assert torch.equal(
        dynamic.predictors.state_dict()["vision.head.4.weight"], trained["predictors.vision.head.4.weight"]
    )


def test_distillation_and_trained_projector_change_the_run(llava_deep_dir, world, tmp_path):
    plain = run_dynamic(job(llava_deep_dir, world, tmp_path / "p", steps=2), Console(quiet=True))
    distilled = run_dynamic(job(llava_deep_dir, world, tmp_path / "d", steps=2, distill_kl=1.0, distill_prumerge=1.0,
                                train_projector=True), Console(quiet=True))  # fmt: skip
    assert plain[0].ce == pytest.approx(distilled[0].ce) and distilled[0].loss > plain[0].loss
    record = json.loads((tmp_path / "d" / "reducer.json").read_text())
    assert record["trained"] == ["predictors", "projector"]
    stored = load_file(tmp_path / "d" / "predictors.safetensors")
    assert any(k.startswith("model.model.multi_modal_projector.") for k in stored)


def test_prumerge_vision_source_trains_only_the_output_predictor(llava_deep_dir, world, tmp_path, capsys):
    from prumerge_cli.devices import DeviceAudit

    data, images = world
    with DeviceAudit() as audit:  # training on --device cpu creates nothing elsewhere
        result = run_cli(capsys, "compress", llava_deep_dir, "-o", tmp_path / "pm", *DYNAMIC_ARGS, "--data", data,
                         "--images", images, "--steps", 2, "--vision-source", "prumerge",
                         "--device", "cpu")  # fmt: skip
    assert result.code == 0, result.err
    assert audit.seen == {"cpu"}
    dynamic, encoder = load_dynamic(tmp_path / "pm")
    assert not dynamic.vision and encoder.reducer.name == "prumerge"


@pytest.mark.parametrize(
    "extra, message",
    [
        ((), "needs --data and --images"),
        (("--data", "missing.json", "--images", "."), "does not exist"),
        (("--data", "bad.json", "--images", "."), "conversations"),
        (("--data", "ok.json", "--images", ".", "--vision-keep", 0), "keep rates"),
    ],
)
def test_bad_input_is_one_clean_line(llava_deep_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.png"}]))
    (tmp_path / "ok.json").write_text(json.dumps([{"image": "x.png", "conversations": []}]))
    result = run_cli(capsys, "compress", llava_deep_dir, "-o", tmp_path / "out", *DYNAMIC_ARGS, *extra)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err
    assert not (tmp_path / "out").exists()


def compress_args(llava_deep_dir, world, output, *extra) -> list[str]:
    data, images = world
    return ["compress", str(llava_deep_dir), "-o", str(output), *map(str, DYNAMIC_ARGS), "--data", str(data),
            "--images", str(images), "--train-projector", *map(str, extra)]  # fmt: skip


def torchrun(args: list[str], port: int) -> subprocess.CompletedProcess:
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [launcher, "--nproc-per-node", "2", "--master-port", str(port), "-m", "prumerge_cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def trained_weights(bundle) -> dict[str, torch.Tensor]:
    return load_file(bundle / "predictors.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]):
    """Equal within fp32 rounding, and both moved on from `start`."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any((a[k] - start[k]).abs().max() > 1e-4 for k in a)


def test_two_processes_train_what_one_process_trains_on_the_whole_batch(llava_deep_dir, world, tmp_path, capsys):
    """Global step = 4 samples, 3 steps: one process with batch 4 = one process accumulating 2 x 2 = two
    `torchrun` processes with 2 each; and a 2-process run stopped after 2 steps and resumed = the straight one."""
    one = compress_args(llava_deep_dir, world, tmp_path / "one", "--steps", 3, "--batch-size", 4)
    assert run_cli(capsys, *one).code == 0
    accumulated = compress_args(llava_deep_dir, world, tmp_path / "acc", "--steps", 3, "--grad-accum", 2)
    assert run_cli(capsys, *accumulated).code == 0
    start = compress_args(llava_deep_dir, world, tmp_path / "start", "--steps", 3, "--batch-size", 4, "--stop-after", 1)
    assert run_cli(capsys, *start).code == 0  # its checkpoint holds the weights after step 0
    after_one = load_file(tmp_path / ".start.checkpoint" / "trainable.safetensors")
    assert (
        "2 processes, DDP"
        in torchrun(compress_args(llava_deep_dir, world, tmp_path / "ddp", "--steps", 3), 29531).stdout
    )
    reference = trained_weights(tmp_path / "one")
    assert_same_weights(trained_weights(tmp_path / "acc"), reference, after_one)
    assert_same_weights(trained_weights(tmp_path / "ddp"), reference, after_one)
    ddp_log = json.loads((tmp_path / "ddp" / "training.json").read_text())
    one_log = json.loads((tmp_path / "one" / "training.json").read_text())
    assert [h["loss"] for h in ddp_log] == pytest.approx([h["loss"] for h in one_log], rel=1e-5)

    resumed = compress_args(llava_deep_dir, world, tmp_path / "res", "--steps", 3)
    proc = torchrun([*resumed, "--stop-after", 2], 29532)
    assert "rerun with --resume" in proc.stdout and not (tmp_path / "res").exists()
    torchrun([*resumed, "--resume"], 29533)
    assert_same_weights(trained_weights(tmp_path / "res"), trained_weights(tmp_path / "ddp"), after_one)
    assert json.loads((tmp_path / "res" / "training.json").read_text()) == ddp_log


def test_fsdp_trains_the_lm_as_one_process_does(llava_deep_dir, world, tmp_path, capsys):
    """With the LM trained, two processes shard it (FSDP): same weights as one process on the whole batch, and
    a stopped and resumed sharded run ends where the straight one does."""
    one = compress_args(llava_deep_dir, world, tmp_path / "one", "--steps", 2, "--batch-size", 4, "--train-llm")
    assert run_cli(capsys, *one).code == 0
    start = compress_args(llava_deep_dir, world, tmp_path / "s", "--steps", 2, "--batch-size", 4, "--train-llm",
                          "--stop-after", 1)  # fmt: skip
    assert run_cli(capsys, *start).code == 0
    after_one = load_file(tmp_path / ".s.checkpoint" / "trainable.safetensors")
    sharded = compress_args(llava_deep_dir, world, tmp_path / "fsdp", "--steps", 2, "--train-llm")
    assert "2 processes, FSDP" in torchrun([*sharded, "--stop-after", 1], 29534).stdout
    torchrun([*sharded, "--resume"], 29535)
    reference = trained_weights(tmp_path / "one")
    assert any(k.startswith("model.model.language_model.layers.0.") for k in reference)
    assert_same_weights(trained_weights(tmp_path / "fsdp"), reference, after_one)


def test_ranks_see_different_samples_and_gumbel_draws():
    from prumerge_cli.training.distributed import Rank
    from prumerge_cli.training.sampling import gumbel_noise, sample_positions

    ranks = [Rank(r, 2, torch.device("cpu")) for r in range(2)]
    shares = [sample_positions(5, 1, 3, 2, rank) for rank in ranks]
    assert sorted(shares[0] + shares[1]) == list(range(66, 72))  # step 5, micro-batch 1 of 2, 6 samples
    draws = [gumbel_noise(0, p, 4, 7) for p in (shares[0][0], shares[1][0])]
    assert not torch.equal(draws[0][0], draws[1][0]) and not torch.equal(draws[0][1], draws[1][1])
    assert all(torch.equal(a, b) for a, b in zip(gumbel_noise(0, 66, 4, 7), gumbel_noise(0, 66, 4, 7), strict=True))


@pytest.mark.parametrize(
    "change, message",
    [
        (("--lr", 2e-3), "lr"),
        (("--batch-size", 3), "batch_size"),
        (("--vision-keep", 0.3), "sparse_config"),
        (("--data", "other"), "data"),
        (("MODEL",), "model"),
    ],
)
def test_resume_refuses_changed_settings(llava_deep_dir, world, tmp_path, capsys, change, message):
    other = write_llava_json(tmp_path / "other", "train", 5)
    change = tuple(other if c == "other" else c for c in change)
    args = compress_args(llava_deep_dir, world, tmp_path / "out", "--steps", 3, "--stop-after", 1)
    assert run_cli(capsys, *args).code == 0
    if change == ("MODEL",):  # the same checkpoint, the base model's weights changed since
        args, change = [args[0], altered_copy(llava_deep_dir, tmp_path / "altered"), *args[2:]], ()
    result = run_cli(capsys, *args, *change, "--resume")
    assert result.code == 2 and "other settings" in result.err and message in result.err
    assert not (tmp_path / "out").exists()


def test_bench_reports_kv_bytes_and_decode_step_against_dense(llava_deep_dir, world, tmp_path, capsys):
    run_dynamic(job(llava_deep_dir, world, tmp_path / "b", steps=2), Console(quiet=True))
    result = run_cli(capsys, "bench", tmp_path / "b", "--synthetic", 2, "--batch-sizes", "1,2", "--iters", 1,
                     "--warmup", 0, "--new-tokens", 6, "--json", tmp_path / "r.json",
                     "--llm-shape", "vicuna-7b:layers=1")  # fmt: skip
    assert result.code == 0, result.err
    assert "Dynamic-LLaVA" in result.out
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["dynamic"][0]["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["image_tokens"] == {"dense": 64.0, "dynamic": 12.0}  # floor(0.2 * 64) from layer 2 on
        # 4 layers, 2 dense: KV = (2 * all + 2 * kept) / (4 * all) < 1 once image tokens are dropped
        assert 0.5 < r["kv_cache_bytes"]["ratio"] < 1.0
        stored = r["kv_tokens_per_sample"]  # allocated = stored tokens rounded up to 16-token blocks
        assert stored["dynamic"]["sparse_layers"] < stored["dense"]["sparse_layers"] == stored["dense"]["dense_layers"]
        per_layer = -(-stored["dense"]["dense_layers"] // 16) * 16 * 2 * 16 * 4  # K and V, 1 head of 16, fp32
        assert r["kv_cache_bytes"]["dense"] == 4 * per_layer * r["batch"]
        projection = r["kv_projection"]  # LLaVA-1.5-7B: 2 dense layers of 32, 115 of 576 image tokens
        assert projection["llm"] == "vicuna-7b" and projection["ratio"] < 0.55
        assert r["decode_step_ms"]["dense"] > 0 and r["prefill_ms"]["ratio"] > 0
        assert 0.0 <= r["fidelity"]["greedy_agreement"] <= 1.0
    assert report["encoder"][0]["baseline"]  # the model's own baseline row is there too


def test_generate_answers_with_a_predictor_bundle(llava_deep_dir, world, tmp_path, capsys):
    """`prumerge generate` on a Dynamic-LLaVA bundle: the streamed greedy answer is the sparse-KV generation's."""
    from prumerge_cli.generate import Asker, Decoding
    from prumerge_cli.models.images import open_image

    data, images = world
    result = run_cli(capsys, "compress", llava_deep_dir, "-o", tmp_path / "d", *DYNAMIC_ARGS, "--data", data,
                     "--images", images, "--steps", 2)  # fmt: skip
    assert result.code == 0, result.err
    picture = next(images.glob("*.png"))
    asker = Asker(tmp_path / "d")
    (answer,) = asker.ask([open_image(picture)], ["what color"], Decoding(max_new_tokens=5))
    reduced = asker.encoder.encode_images([open_image(picture)], project=True)
    expected = asker.dynamic.generate(reduced, asker.lm.encode(["what color"]), 5).texts(asker.lm.eos_id)[0]
    assert answer.token_ids == expected
    assert answer.visual_tokens == asker.dynamic.config.vision_keep(int(reduced.lengths[0]))
    res = run_cli(capsys, "generate", tmp_path / "d", "--image", picture, "--prompt", "what color",
                  "--max-new-tokens", 5)  # fmt: skip
    assert res.code == 0, res.err
    assert f"{answer.visual_tokens} visual tokens kept" in res.out
    res = run_cli(capsys, "generate", tmp_path / "d", "--image", picture, "--prompt", "x", "--temperature", 1)
    assert res.code == 2 and "decodes greedily" in res.err


def test_mix665k_style_records_and_templates(llava_deep_dir, world, tmp_path):
    """Text-only records are skipped (the official loader trains on image records); a missing image stops the
    run unless --skip-missing-images; vicuna_v1 puts its system prompt and `USER:` before the image."""
    from transformers import AutoTokenizer

    from prumerge_cli.errors import PrumergeError
    from prumerge_cli.training.conversations import VICUNA_SYSTEM, load_examples

    data, images = world
    records = json.loads(data.read_text())[:2]
    records.append({"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]})
    records.append({**records[0], "image": "absent.png"})
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(records))
    tokenizer = AutoTokenizer.from_pretrained(llava_deep_dir)
    with pytest.raises(PrumergeError, match="1 of 4 records name a missing or unreadable image"):
        load_examples(mixed, images, tokenizer)
    plain = load_examples(mixed, images, tokenizer, skip_missing_images=True)
    assert (len(plain.examples), plain.text_only, plain.missing_images) == (2, 1, 1)
    vicuna = load_examples(mixed, images, tokenizer, "vicuna_v1", skip_missing_images=True).examples[0]
    assert vicuna.prefix == tokenizer(f"{VICUNA_SYSTEM} USER:", add_special_tokens=False)["input_ids"] != []
    answer = vicuna.text[vicuna.answer_start :]
    assert all(vicuna.targets[vicuna.answer_start :])
    final = records[0]["conversations"][-1]["value"]
    assert answer == [*tokenizer(f" {final}", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert vicuna.text[: vicuna.answer_start] != plain.examples[0].text[: plain.examples[0].answer_start]
    history = run_dynamic(
        DynamicJob(
            **{
                **vars(job(llava_deep_dir, (mixed, images), tmp_path / "v", steps=2)),
                "template": "vicuna_v1",
                "skip_missing_images": True,
            }
        ),
        Console(quiet=True),
    )
    assert len(history) == 2 and 0 < history[0].ce < 100  # the image span starts after the system prompt


def test_gradient_checkpointing_is_exact_and_bf16_trains(llava_deep_dir, world, tmp_path):
    base = run_dynamic(job(llava_deep_dir, world, tmp_path / "a", steps=2, train_llm=True), Console(quiet=True))
    ckpt = run_dynamic(job(llava_deep_dir, world, tmp_path / "b", steps=2, train_llm=True,
                           gradient_checkpointing=True), Console(quiet=True))  # fmt: skip
    assert [h.loss for h in ckpt] == pytest.approx([h.loss for h in base], rel=1e-6)
    a, b = trained_weights(tmp_path / "a"), trained_weights(tmp_path / "b")
    assert any(k.startswith("model.model.language_model.layers.3") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)
    bf16 = run_dynamic(job(llava_deep_dir, world, tmp_path / "c", steps=2, precision="bf16"), Console(quiet=True))
    assert all(abs(h.ce - f.ce) < 0.1 * f.ce for h, f in zip(bf16, base, strict=True)) and bf16[0].ce != base[0].ce


def llava_config_dir(path, hidden: int, mlp: int, layers: int):
    """A LLaVA-1.5-shaped checkpoint directory with config.json only (CLIP-L/336 tower, Vicuna LM)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)  # fmt: skip
    text = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=hidden // 128, vocab_size=32064)  # fmt: skip
    LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_seq_length=576).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "size, hidden, mlp, layers, plain_fits", [("7b", 4096, 11008, 32, True), ("13b", 5120, 13824, 40, False)]
)
def test_plan_of_llava_1_5_on_eight_80gb_gpus(tmp_path, capsys, size, hidden, mlp, layers, plain_fits):
    model = llava_config_dir(tmp_path / size, hidden, mlp, layers)
    args = ("compress", model, "-o", tmp_path / "out", "--method", "dynamic", "--plan", "--gpus", 8,
            "--gpu-memory", 80, "--precision", "bf16", "--batch-size", 8, "--seq-len", 2048)  # fmt: skip
    plain = run_cli(capsys, *args)
    assert plain.code == (0 if plain_fits else 1) and "DDP" in plain.out
    official = run_cli(capsys, *args, "--official", "--gradient-checkpointing")
    assert official.code == 0 and "FSDP" in official.out and ": fits" in official.out
    rows = {line[:25].strip(): float(line[25:].split()[0]) for line in official.out.splitlines() if "GiB" in line}
    parameters = {"7b": 6.74e9, "13b": 13.0e9}[size]  # LM and head, about
    assert rows["optimizer (AdamW)"] == pytest.approx(8 * parameters / 8 / 2**30, rel=0.06)  # sharded over 8
    assert rows["activations"] < rows["optimizer (AdamW)"] + 3  # checkpointing keeps only layer inputs
    assert not (tmp_path / "out").exists()
