"""Score fine-tuned bundles of the embedded LLaVA on one split, beside the model with every token: how recipes are
chosen on the val split, keeping the test split for the figures reported.
Usage: python -m prumerge_cli.zoo.compare DIR [DIR ...] [--split val] [--images 300] [--json FILE]"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import atomic
from ..cli import quiet_transformers
from ..cli.console import out_console
from ..demo import accuracy_fields, finetuned_rows, percent, row_label
from ..encoder import ReducedVisionEncoder
from ..lm.llava_lm import LlavaLm
from ..progress import Phases
from ..tables import FoldingTable
from . import LLAVA_DIR
from .vqa import vqa_accuracy


def main(argv: list[str] | None = None) -> int:
    """Score every fine-tuned bundle in the given directories and print one table (and JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="Directories of fine-tuned bundles.")
    parser.add_argument("--split", default="val", choices=("val", "test"), help="The split scored (default val).")
    parser.add_argument("--images", type=int, default=300, help="Images scored, 6 questions each.")
    parser.add_argument("--json", type=Path, help="Write the rows to this file.")
    args = parser.parse_args(argv)
    quiet_transformers()
    console, cpu = out_console(), torch.device("cpu")
    with Phases(console) as phases:
        with phases.phase(f"every token: score {args.images} {args.split} images", args.images) as advance:
            every = ReducedVisionEncoder.from_pretrained(LLAVA_DIR, "none")
            full = vqa_accuracy(every, LlavaLm.from_pretrained(LLAVA_DIR), args.split, args.images, progress=advance)
        rows = [{"method": "none", "params": {}, "dir": "-", "tokens": full.tokens_mean, **accuracy_fields(full)}]
        for directory in args.dirs:
            tuned, skipped = finetuned_rows(directory, LLAVA_DIR, args.images, cpu, phases, args.split)
            rows += [{**r, "dir": str(directory)} for r in tuned]
            for reason in skipped:
                console.print(f"skipped {reason}", highlight=False)
    table = FoldingTable(f"Fine-tuned bundles on {args.images} {args.split} images (6 questions each)",
                         ["method", "bundles", "visual tokens", "accuracy % (95% CI)", "of every token's"],
                         left=("bundles",))  # fmt: skip
    for r in rows:
        table.add_row(row_label(r), r["dir"], f"{r['tokens']:.1f}", percent(r),
                      f"{100 * r['accuracy'] / full.accuracy['overall']:.1f}%")  # fmt: skip
    table.print(console)
    if args.json is not None:
        atomic.write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
