"""`prumerge compress` and `prumerge inspect`: outputs, bundles, overlays, clean errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

import prumerge_cli
from prumerge_cli.models.images import open_image

from .cli_helpers import run_cli, run_subprocess


def test_public_names_load_on_first_use():
    assert sorted(prumerge_cli.__all__) == sorted(prumerge_cli._HOMES)
    for name in prumerge_cli.__all__:
        assert getattr(prumerge_cli, name) is not None
    try:
        prumerge_cli.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def assert_clean_error(result, fragment: str) -> None:
    assert result.code == 2, result
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.err
    assert "Traceback" not in result.err


def test_compress_writes_a_bundle_that_loads_back(capsys, clip_dir, image_paths, tmp_path):
    bundle = tmp_path / "bundle"
    res = run_cli(capsys, "compress", clip_dir, "--method", "prumerge+", "-p", "knn=16", "-o", bundle)
    assert res.code == 0, res.err
    record = json.loads((bundle / "reducer.json").read_text())
    assert record["method"] == "prumerge+" and record["params"]["knn"] == 16
    assert record["model"]["model_type"] == "clip_vision_model" and len(record["model"]["sha256"]) == 64
    assert {"prumerge", "torch", "transformers"} <= set(record["versions"])
    loaded = prumerge_cli.load(bundle)
    direct = prumerge_cli.ReducedVisionEncoder.from_pretrained(clip_dir, "prumerge+", knn=16)
    images = [open_image(p) for p in image_paths]
    a, b = loaded.encode_images(images), direct.encode_images(images)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)


def test_existing_bundle_needs_force(capsys, clip_dir, tmp_path):
    bundle = tmp_path / "bundle"
    assert run_cli(capsys, "compress", clip_dir, "-o", bundle).code == 0
    assert_clean_error(run_cli(capsys, "compress", clip_dir, "-m", "topk", "-o", bundle), "already exists")
    assert json.loads((bundle / "reducer.json").read_text())["method"] == "prumerge"
    assert run_cli(capsys, "compress", clip_dir, "-m", "topk", "-o", bundle, "--force").code == 0
    assert json.loads((bundle / "reducer.json").read_text())["method"] == "topk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_failed_compress_leaves_nothing(capsys, tmp_path, clip_dir):
    out = tmp_path / "out" / "bundle"
    assert_clean_error(run_cli(capsys, "compress", tmp_path / "missing", "-o", out), "does not exist")
    assert_clean_error(run_cli(capsys, "compress", clip_dir, "-m", "magic", "-o", out), "unknown method")
    assert_clean_error(run_cli(capsys, "compress", clip_dir, "-p", "knn=abc", "-o", out), "should be int")
    assert_clean_error(run_cli(capsys, "compress", clip_dir, "-p", "knn", "-o", out), "KEY=VALUE")
    assert not out.exists()


def test_changed_weights_are_detected(capsys, tmp_path, clip_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(clip_dir, model)
    assert run_cli(capsys, "compress", model, "-o", tmp_path / "b").code == 0
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (model / "model.safetensors").write_bytes(bytes(data))
    res = run_cli(capsys, "inspect", tmp_path / "b", tmp_path)
    assert res.code == 2


def test_inspect_table_json_and_overlays(capsys, clip_dir, image_paths, tmp_path):
    report, overlays = tmp_path / "r.json", tmp_path / "ov"
    res = run_cli(
        capsys,
        "inspect",
        clip_dir,
        image_paths[0].parent,
        "-m",
        "prumerge",
        "--json",
        report,
        "--overlay",
        overlays,
        "--batch-size",
        "3",
    )
    assert res.code == 0, res.err
    assert "mean" in res.out and image_paths[0].name in res.out
    data = json.loads(report.read_text())
    assert data["num_patches"] == 576 and len(data["images"]) == len(image_paths)
    enc = prumerge_cli.ReducedVisionEncoder.from_pretrained(clip_dir, "prumerge")
    for row in data["images"]:
        out = enc.encode_images([open_image(row["image"])])
        assert row["tokens"] == int(out.lengths[0]) and row["extra_token"]
        assert row["kept_patches"] == out.indices[0, : row["tokens"] - 1].tolist()
    pngs = sorted(overlays.glob("*.png"))
    assert len(pngs) == len(image_paths)
    assert Image.open(pngs[0]).size[0] >= 336


def test_inspect_bundle_with_method_override(capsys, clip_dir, image_paths, tmp_path):
    assert run_cli(capsys, "compress", clip_dir, "-o", tmp_path / "b").code == 0
    res = run_cli(
        capsys, "inspect", tmp_path / "b", image_paths[0], "-m", "pool", "-p", "side=6", "--json", tmp_path / "r.json"
    )
    assert res.code == 0, res.err
    assert json.loads((tmp_path / "r.json").read_text())["images"][0]["tokens"] == 36


def test_inspect_bad_image_is_a_clean_error(capsys, clip_dir, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    report = tmp_path / "r.json"
    assert_clean_error(run_cli(capsys, "inspect", clip_dir, bad, "--json", report), "cannot read image")
    assert not report.exists()
    assert_clean_error(run_cli(capsys, "inspect", clip_dir, tmp_path / "none.png"), "does not exist")


def test_subprocess_help_and_exit_codes(clip_dir, tmp_path):
    res = run_subprocess("--help")
    assert res.code == 0 and "compress" in res.out and "inspect" in res.out
    helps = "\n".join(f"sys.argv = ['prumerge', '{c}', '--help']\ntry:\n    main()\nexcept SystemExit:\n    pass"
                      for c in ("compress", "export", "inspect", "bench", "generate", "demo", "convert"))  # fmt: skip
    script = f"import sys\nfrom prumerge_cli.cli import main\n{helps}\nprint('transformers' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.count("Usage") == 7 and proc.stdout.split()[-1] == "False", proc.stdout[-300:] + proc.stderr
    res = run_subprocess("compress", tmp_path / "nothing", "-o", tmp_path / "b")
    assert_clean_error(res, "does not exist")
    res = run_subprocess("compress", clip_dir, "--bogus-option")
    assert res.code == 2 and "Traceback" not in res.err


def test_usage_errors_are_one_line_with_exit_code_2(capsys, clip_dir):
    """Typer's usage errors (unknown or missing options and arguments, bad values) as one line naming the help."""
    for args, words in [
        (("compress", clip_dir, "--bogus-option"), "No such option: --bogus-option"),
        (("export",), "Missing argument 'TARGET'"),
        (("export", clip_dir, "--onnx", "--plugins", "bogus", "-o", "x"), "--plugins takes jit, aot, none"),
        (("compress", clip_dir, "-o", "x", "--steps", "nan"), "Invalid value for '--steps'"),
    ]:
        res = run_cli(capsys, *args)
        assert res.code == 2, (args, res.err)
        assert words in res.err and len(res.err.strip().splitlines()) == 1, (args, res.err)
        assert "--plugins" in words or f"(see 'prumerge {args[0]} --help')" in res.err
    res = run_cli(capsys, "--version")
    assert res.code == 0 and res.out.startswith("prumerge ")
    res = run_cli(capsys)
    assert res.code == 0 and "compress" in res.out


def test_outputs_are_checked_before_any_work_and_nothing_is_left_behind(capsys, clip_dir, tmp_path, monkeypatch):
    """A file where a directory is needed, the current directory, an uncreatable place, an existing output without
    --force and batch sizes below one: one line, exit code 2, nothing written; outputs get the usual permissions."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    monkeypatch.chdir(tmp_path)
    cases = [
        (("compress", clip_dir, "-o", a_file), "is a file"),
        (("compress", clip_dir, "-o", ".", "--force"), "current directory"),
        (("compress", clip_dir, "--method", "dynamic", "--data", "d.json", "--images", ".", "-o", a_file), "is a file"),
        (("world", "-o", "/proc/prumerge-x", "--count", "1"), "cannot create /proc/prumerge-x"),
        (("export", clip_dir, "--onnx", "--batch-size", "0", "-o", "b0"), "--batch-size must be at least 1"),
        (("export", clip_dir, "--onnx", "--max-batch", "0", "-o", "m0"), "--max-batch must be at least 1"),
        (("inspect", clip_dir, a_file, "--json", "/proc/prumerge-r.json"), "cannot write /proc/prumerge-r.json"),
        (("bench", clip_dir, "--json", tmp_path), "is a directory; a file is needed"),
    ]
    for args, words in cases:
        res = run_cli(capsys, *args)
        assert res.code == 2 and words in res.err and len(res.err.strip().splitlines()) == 1, (args, res.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    res = run_cli(capsys, "compress", clip_dir, "-o", "bundle")
    assert res.code == 0, res.err
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o777 & ~current_umask()
    assert (tmp_path / "bundle" / "reducer.json").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    res = run_cli(capsys, "compress", clip_dir, "-o", "bundle")
    assert res.code == 2 and "already exists; pass --force" in res.err


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_with_max_batch_one_is_a_fixed_batch_of_one(capsys, clip_dir, tmp_path):
    res = run_cli(capsys, "export", clip_dir, "--onnx", "--max-batch", "1", "-o", tmp_path / "e")
    assert res.code == 0, res.err
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["batch"] == {"fixed": 1} and manifest["inputs"][0]["shape"][0] == 1


def test_piped_tables_are_not_cut_and_hub_ids_get_a_hint(clip_dir, tmp_path):
    """As a user pipes it: the compress table keeps its full lines; a hub id is named as such."""
    res = run_subprocess("compress", clip_dir, "-o", tmp_path / "b", "-m", "topk", "-p", "budget=1000")
    assert res.code == 0, res.err
    assert re.search(r"at most (\d+) of \1 patches, plus the merged extra token", res.out), res.out
    assert str(clip_dir) in res.out  # the model path is printed whole, not cut at 80 columns
    res = run_subprocess("compress", "llava-hf/llava-1.5-7b-hf", "-o", tmp_path / "c")
    assert res.code == 2 and "reads local checkpoints only" in res.err and "huggingface-cli download" in res.err


def test_bundles_find_their_model_relative_to_them_and_check_weights_by_fingerprint(capsys, clip_dir, image_paths,
                                                                                  tmp_path):  # fmt: skip
    """A bundle moved together with its model still loads (relative path); a model moved alone is named, and
    --model points to it; a copy (new mtime, same bytes) passes after a full hash; changed weights are refused;
    a format-1 bundle (absolute path, full hash only) still loads."""
    import os
    import shutil

    project = tmp_path / "project"
    shutil.copytree(clip_dir, project / "models" / "clip")
    assert run_cli(capsys, "compress", project / "models" / "clip", "-o", project / "bundle").code == 0
    record = json.loads((project / "bundle" / "reducer.json").read_text())
    assert record["format_version"] == 2 and record["model"]["path"] == "../models/clip"
    moved = shutil.move(project, tmp_path / "moved")
    bundle, model = Path(moved) / "bundle", Path(moved) / "models" / "clip"
    assert prumerge_cli.load(bundle).model_dir.resolve() == model.resolve()
    elsewhere = shutil.move(model, tmp_path / "elsewhere")
    assert_clean_error(run_cli(capsys, "inspect", bundle, image_paths[0]), "pass --model DIR")
    assert run_cli(capsys, "inspect", bundle, image_paths[0], "--model", elsewhere).code == 0
    weights = next(Path(elsewhere).glob("*.safetensors"))
    os.utime(weights, ns=(1, 1))  # a copy: same bytes, new modification time
    assert run_cli(capsys, "inspect", bundle, image_paths[0], "--model", elsewhere).code == 0
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    res = run_cli(capsys, "inspect", bundle, image_paths[0], "--model", elsewhere, "--full-hash")
    assert_clean_error(res, "are not those the bundle was written for")
    old = {**record, "format_version": 1, "model": {**record["model"], "path": str(clip_dir.resolve())}}
    del old["model"]["fingerprints"], old["model"]["absolute_path"]
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "reducer.json").write_text(json.dumps(old))
    assert prumerge_cli.load(tmp_path / "v1").model_dir == clip_dir.resolve()


def test_overlays_of_same_named_images_do_not_overwrite_each_other(capsys, clip_dir, image_paths, tmp_path):
    """a/img.png and b/img.png get two overlays; each shows the image untouched beside the merge map."""
    import shutil

    from prumerge_cli.overlay import MIN_SIDE, model_view

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    shutil.copy(image_paths[0], tmp_path / "a" / "img.png")
    shutil.copy(image_paths[1], tmp_path / "b" / "img.png")
    res = run_cli(capsys, "inspect", clip_dir, tmp_path / "a", tmp_path / "b", "--overlay", tmp_path / "ov")
    assert res.code == 0, res.err
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["a__img.png.overlay.png", "b__img.png.overlay.png"]
    enc = prumerge_cli.ReducedVisionEncoder.from_pretrained(clip_dir, "prumerge")
    view = model_view(open_image(tmp_path / "a" / "img.png"), enc.processor, enc.image_size)
    scale = -(-MIN_SIDE // view.width)
    shown = Image.open(tmp_path / "ov" / "a__img.png.overlay.png").convert("RGB")
    assert shown.width > 2 * view.width * scale and shown.height > view.height * scale
    kept = set(enc.encode_images([view]).indices[0].tolist())
    pruned = next(p for p in range(enc.grid[0] * enc.grid[1]) if p not in kept)
    r, c = divmod(pruned, enc.grid[1])
    cell = view.width * scale // enc.grid[1]
    x, y = c * cell + cell // 2, r * cell + cell // 2
    top = shown.height - 30 - view.height * scale  # below the title
    assert shown.getpixel((12 + x, top + y)) == view.convert("RGB").getpixel((x // scale, y // scale))


def test_one_spelling_of_dtypes_with_long_names_as_aliases(capsys, clip_dir, tmp_path):
    for name in ("fp16", "float16"):
        assert run_cli(capsys, "compress", clip_dir, "--dtype", name, "-o", tmp_path / name).code == 0
        assert json.loads((tmp_path / name / "reducer.json").read_text())["dtype"] == "fp16"
    assert_clean_error(run_cli(capsys, "compress", clip_dir, "--dtype", "int4", "-o", tmp_path / "x"), "choose fp32")
    res = run_cli(capsys, "compress", clip_dir, "--score-dtype", "bogus", "-o", tmp_path / "y")
    assert_clean_error(res, "--score-dtype takes 'model' or 'fp32'")
    res = run_cli(capsys, "export", clip_dir, "--onnx", "--dtype", "bf16", "-o", tmp_path / "z")
    assert_clean_error(res, "unsupported dtype 'bf16'; choose fp32, fp16")
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_commands_on_the_cpu_create_tensors_on_the_cpu_only(capsys, clip_dir, image_paths, tmp_path):
    """The device audit (a torch function mode recording where every tensor a torch function returns lives)
    around each command run with --device cpu; a device that is not there is refused in one line."""
    from prumerge_cli.devices import DeviceAudit

    runs = [
        ("compress", clip_dir, "-o", tmp_path / "b", "--device", "cpu"),
        ("inspect", tmp_path / "b", image_paths[0], "--device", "cpu", "--dtype", "bf16"),
        ("export", tmp_path / "b", "--onnx", "-o", tmp_path / "e", "--device", "cpu"),
        ("bench", tmp_path / "b", "--images", image_paths[0].parent, "--iters", "1", "--warmup", "0",
         "--batch-sizes", "1", "--llm-shape", "vicuna-7b:layers=1", "--device", "cpu"),
    ]  # fmt: skip
    for args in runs:
        with DeviceAudit() as audit:
            res = run_cli(capsys, *args)
        assert res.code == 0, (args, res.err)
        assert audit.seen == {"cpu"}, (args[0], audit.seen)
    if not torch.cuda.is_available():
        res = run_cli(capsys, "inspect", tmp_path / "b", image_paths[0], "--device", "cuda")
        assert_clean_error(res, "no CUDA device is visible")
    assert_clean_error(run_cli(capsys, "compress", clip_dir, "-o", tmp_path / "c", "--device", "tpu"), "device")


def test_a_model_with_nan_weights_is_a_clean_error(capsys, clip_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-clip"
    shutil.copytree(clip_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in load_file(weights).items()}
    save_file(state, weights)
    assert_clean_error(run_cli(capsys, "compress", broken, "-o", tmp_path / "b"), "NaN or Inf")
    assert_clean_error(run_cli(capsys, "export", broken, "--onnx", "-o", tmp_path / "e"), "NaN or Inf")
    assert not (tmp_path / "b").exists() and not (tmp_path / "e").exists()
