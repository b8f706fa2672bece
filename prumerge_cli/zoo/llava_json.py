"""Write the procedural world in LLaVA's conversation JSON format, with its image files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .. import atomic
from .world import make_sample, split_seed

DATA_FILE = "data.json"


def conversation(index: int, split: str) -> tuple[dict, object]:
    """One LLaVA record (the image first, then its training conversation as turns) and its image."""
    sample = make_sample(split_seed(split, index))
    name = f"{split}-{index:07d}"
    turns = []
    for i, qa in enumerate(sample.lesson):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + qa.question})
        turns.append({"from": "gpt", "value": qa.reply})
    record = {"id": name, "image": f"{name}.png", "caption": sample.caption, "conversations": turns}
    return record, sample.image


def write_llava_json(out_dir: Path, split: str, count: int, force: bool = False,
                     advance: Callable[[], None] = lambda: None) -> Path:  # fmt: skip
    """`out_dir/data.json` and `out_dir/images/*.png` for samples 0..count-1 of `split`, written atomically;
    `advance` is called after each image."""
    with atomic.atomic_dir(out_dir, force=force) as tmp:
        (tmp / "images").mkdir()
        records = []
        for i in range(count):
            record, image = conversation(i, split)
            image.save(tmp / "images" / record["image"])
            records.append(record)
            advance()
        (tmp / DATA_FILE).write_text(json.dumps(records, indent=1) + "\n")
    return out_dir / DATA_FILE
