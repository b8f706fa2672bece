"""What a careless user types: conflicting or out-of-range values, existing files without --force, outputs whose
suffix names another format, a file where a checkpoint directory is needed, unreadable images, and a training rerun
that would drop an unfinished run's checkpoint. Each is one line on stderr, exit code 2, before any work, and
nothing is left behind."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from prumerge_cli.training.checkpoints import save_checkpoint

from .cli_helpers import run_cli


def assert_refused(result, fragment: str) -> None:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 2 and len(lines) == 1 and fragment in lines[0], result
    assert "Traceback" not in result.err


@pytest.fixture
def data(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "data.json").write_text("[]")
    return tmp_path / "data.json", tmp_path / "images"


def test_conflicting_and_out_of_range_values_are_refused_before_any_work(capsys, clip_dir, image_paths, tmp_path,
                                                                         data, monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    conversations, images = data
    tune = ("--finetune", "--data", conversations, "--images", images)
    cases = [
        (("compress", clip_dir, "-o", "b", *tune, "--lr", "-1"), "--lr must be positive"),
        (("compress", clip_dir, "-o", "b", *tune, "--lora-alpha", "0"), "--lora-alpha must be positive"),
        (("compress", clip_dir, "-o", "b", *tune, "--steps", "0"), "Invalid value for '--steps'"),
        (("compress", clip_dir, "-o", "b", "--merge-lora", "--finetune"), "takes neither --finetune"),
        (("compress", clip_dir, "-o", "b", *tune, "--resume", "--restart"), "either --resume or --restart"),
        (("compress", clip_dir / "model.safetensors", "-o", "b"), "is a file; pass the checkpoint directory"),
        (("export", clip_dir, "--onnx", "--batch-size", "4", "--max-batch", "2", "-o", "e"), "give one of them"),
        (("generate", clip_dir, "--image", image_paths[0], "--prompt", "x", "-o", "a.jsonl"), "--output writes"),
        (("bench", clip_dir, "--threads", "-1"), "Invalid value for '--threads'"),
        (("bench", clip_dir, "--plot", "plot.gif"), "should end in .png or .jpg"),
        (("bench", clip_dir, "--json", "report.txt"), "should end in .json"),
        (("inspect", clip_dir, image_paths[0], "--json", "r.csv"), "should end in .json"),
    ]
    for args, words in cases:
        assert_refused(run_cli(capsys, *args), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "images"]


def test_every_output_file_needs_force_like_directories(capsys, clip_dir, image_paths, tmp_path):
    report, overlays = tmp_path / "r.json", tmp_path / "ov"
    report.write_text("mine")
    overlays.mkdir()
    (overlays / "mine.txt").write_text("mine")
    for args in (("--json", report), ("--overlay", overlays)):
        assert_refused(run_cli(capsys, "inspect", clip_dir, image_paths[0], *args), "pass --force")
    assert report.read_text() == "mine" and (overlays / "mine.txt").exists()
    res = run_cli(capsys, "inspect", clip_dir, image_paths[0], "--json", report, "--overlay", overlays, "--force")
    assert res.code == 0, res.err
    assert json.loads(report.read_text())["images"] and [p.suffix for p in overlays.iterdir()] == [".png"]
    answers = tmp_path / "a.jsonl"
    answers.write_text("mine")
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": str(image_paths[0]), "prompt": "x"}) + "\n")
    assert_refused(run_cli(capsys, "generate", clip_dir, "--batch", tmp_path / "q.jsonl", "-o", answers), "--force")
    plot = tmp_path / "p.png"
    plot.write_text("mine")
    assert_refused(run_cli(capsys, "bench", clip_dir, "--plot", plot), "pass --force")
    assert answers.read_text() == "mine" and plot.read_text() == "mine"


def test_unreadable_images_are_named_with_the_reason(capsys, clip_dir, tmp_path):
    cut = tmp_path / "cut.png"
    Image.new("RGB", (32, 32), "red").save(cut)
    cut.write_bytes(cut.read_bytes()[:40])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    for path, reason in ((text, "not an image format Pillow can read"), (cut, "cut.png: "), (folder, "")):
        res = run_cli(capsys, "inspect", clip_dir, path)
        assert res.code == 2 and "OSError" not in res.err and "Error" not in res.err, res.err
        assert reason in res.err or path == folder, res.err


def test_transparent_and_gif_images_are_read_as_the_processor_reads_them(capsys, clip_dir, tmp_path):
    """A GIF in a directory is found; transparent pixels are white, as transformers' processors convert them."""
    from prumerge_cli.models.images import collect_images, open_image

    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "b.gif")
    assert [p.name for p in collect_images([tmp_path])] == ["b.gif", "clear.png"]
    assert open_image(tmp_path / "clear.png").getpixel((3, 3)) == (255, 255, 255)
    assert open_image(tmp_path / "b.gif").getpixel((3, 3)) == (0, 0, 255)


def test_a_rerun_never_drops_an_unfinished_training_silently(capsys, llava_dir, tmp_path, data):
    """Without --resume an existing checkpoint is refused (with its step); --resume without one is refused;
    --restart deletes it and starts over."""
    conversations, images = data
    output = tmp_path / "tuned"
    checkpoint = tmp_path / ".tuned.checkpoint"
    save_checkpoint(checkpoint, {"w": torch.zeros(1)}, {"next_step": 50})
    args = ("compress", llava_dir, "-o", output, "--finetune", "--data", conversations, "--images", images)
    assert_refused(run_cli(capsys, *args), "checkpointed at step 50")
    assert (checkpoint / "state.pt").is_file()
    res = run_cli(capsys, *args, "--restart")
    assert not checkpoint.exists() and not output.exists()
    assert res.code == 2 and "checkpoint" not in res.err  # the empty data is what stops it now
    assert_refused(run_cli(capsys, *args, "--resume"), "--resume: no checkpoint")


def test_generate_names_the_words_the_embedded_model_cannot_read(capsys, tmp_path):
    from prumerge_cli import ReducedVisionEncoder
    from prumerge_cli.zoo import LLAVA_DIR
    from prumerge_cli.zoo.world import samples_of

    bundle, image = tmp_path / "bundle", tmp_path / "image.png"
    ReducedVisionEncoder.from_pretrained(LLAVA_DIR, "prumerge").save(bundle)
    samples_of("test", 4, 1)[0].image.save(image)
    res = run_cli(capsys, "generate", bundle, "--image", image, "--prompt", "What is in the image?")
    warnings = res.err.splitlines()
    assert res.code == 0 and len(warnings) == 2, res.err
    assert "does not know 'in'" in warnings[0] and "'what color is the object at center'" in warnings[1]
    res = run_cli(capsys, "generate", bundle, "--image", image, "--prompt", "what color is the object at center")
    assert res.code == 0 and res.err == "" and res.out.splitlines()[0] == "blue", res
