"""What a person reads: progress lines in a log, tables and help on an 80-column terminal, overlay colours."""

from __future__ import annotations

import io
import re

from PIL import Image
from rich.console import Console

from prumerge_cli.overlay import DISTINCT, NEAR, frame_colours, palette
from prumerge_cli.progress import Phases
from prumerge_cli.tables import FoldingTable
from prumerge_cli.zoo.vqa import VqaScore

from .cli_helpers import run_subprocess


def test_a_log_gets_a_line_per_phase_with_its_time_and_counts_while_it_runs():
    log = io.StringIO()
    console = Console(file=log, width=100)
    assert not console.is_terminal
    with Phases(console, log_every=0.0) as phases:
        with phases.phase("scoring 4 images", 4) as advance:
            advance(2)
            advance(2)
        with phases.phase("timing") as advance:
            advance()
    lines = log.getvalue().splitlines()
    assert lines[0] == "scoring 4 images (4 steps)..."
    assert re.fullmatch(r"  scoring 4 images: 2/4 after [\d.]+ s, about [\d.]+ s left", lines[1]), lines
    assert re.fullmatch(r"scoring 4 images: done in [\d.]+ s", lines[3]), lines
    assert lines[4] == "timing..." and re.fullmatch(r"timing: done in [\d.]+ s", lines[-1]), lines


def test_tables_on_80_columns_fold_instead_of_cutting_names_and_numbers():
    out = io.StringIO()
    table = FoldingTable("Fine-tuned vs training-free", ["method", "visual tokens", "fine-tuned % (95% CI)",
                                                          "training-free %", "of full", "color", "shape", "size",
                                                          "count", "relation", "presence"])  # fmt: skip
    table.add_row("prumerge+", "156.2", "94.1 ±1.2", "72.1", "98.6%", "98.5", "95.0", "95.5", "89.5", "99.5", "86.5")
    table.add_row("random budget=155", "155.0", "92.7 ±1.5", "-", "97.1%", "100", "90.5", "99.5", "86.0", "99", "81")
    table.print(Console(file=out, width=80))
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "(continued)" in text and text.count("random budget=155") == 2  # two parts, each led by the names
    for cell in ("prumerge+", "94.1 ±1.2", "156.2", "98.6%", "86.5"):
        assert cell in text, cell


def test_help_names_values_plainly_and_fits_80_columns():
    for command in ("compress", "inspect", "bench", "export", "generate", "eval", "demo"):
        res = run_subprocess(command, "--help", env={"COLUMNS": "80"})
        assert res.code == 0, res.err
        assert not re.search(r"<(bool|str|int|float|path|list\[\w+\])>|\{\w+\}|…|\[x[<>]=", res.out), (command, res.out)
        assert len(res.out.splitlines()) <= 120, (command, len(res.out.splitlines()))  # compress has 50 options
    assert "Usage: prumerge compress [OPTIONS] MODEL_DIR" in run_subprocess("compress", "--help").out


def test_frame_colours_avoid_the_image_s_own_and_neighbours_differ():
    red, green = DISTINCT[0], DISTINCT[1]
    image = Image.new("RGB", (64, 64), red)
    image.paste(green, (0, 0, 32, 64))
    colours = frame_colours(image)
    assert red not in colours and green not in colours and len(colours) >= 8
    assert all(min(sum((a - b) ** 2 for a, b in zip(c, own, strict=True)) ** 0.5 for own in (red, green)) >= NEAR
               for c in colours)  # fmt: skip
    kept = [0, 1, 2, 16, 17, 18, 32, 33, 34]  # a 3x3 block of a 16-wide grid: all within two patches
    chosen = palette(kept, (16, 16), colours)
    assert len(set(chosen)) == len(kept)


def test_accuracy_interval_takes_images_as_the_unit():
    score = VqaScore({"overall": 0.75}, 1.0, 1, 1, 24, per_image_accuracy=[1.0, 0.5, 0.5, 1.0])
    mean_sq = sum((a - 0.75) ** 2 for a in score.per_image_accuracy) / 3
    assert abs(score.ci95 - 1.96 * (mean_sq / 4) ** 0.5) < 1e-12


def test_a_finetuned_bundle_of_other_steps_says_so():
    from prumerge_cli.demo import print_finetuned

    def tuned(method, params, steps):
        return {"method": method, "params": params, "tokens": 35.0, "accuracy": 0.9, "accuracy_ci95": 0.01,
                "per_type": {"color": 1.0, "overall": 0.9}, "positions": "original", "steps": steps}  # fmt: skip

    out = io.StringIO()
    full = [{"method": "none", "params": {}, "accuracy": 0.95, "positions": "original", "tokens": 256.0}]
    rows = [tuned("prumerge", {}, 2400), tuned("pool", {"side": 6}, 2400), tuned("random", {"budget": 155}, 1200)]
    print_finetuned(full, rows, Console(file=out, width=160))
    text = out.getvalue()
    assert "random budget=155 (1200 steps)" in text and "prumerge (" not in text and "side=6 (" not in text
