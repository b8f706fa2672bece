"""Training data in LLaVA's conversation JSON format: one image per record, alternating human/gpt turns.
Template `plain` (the embedded model's): `<s> <image> q1 a1 </s> q2 a2 </s> ...`, loss on answers and `</s>`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PrumergeError

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Example:
    """Token ids after the image, which of them are targets, and where the final answer starts."""

    image: Path
    text: list[int]
    targets: list[bool]
    answer_start: int


def read_records(data_file: Path) -> list[dict]:
    """The JSON list of records, with a clean error for anything else."""
    try:
        records = json.loads(data_file.read_text())
    except FileNotFoundError:
        raise PrumergeError(f"data file {data_file} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrumergeError(f"{data_file} is not valid JSON: {exc}") from None
    if not isinstance(records, list) or not records:
        raise PrumergeError(f"{data_file} must hold a non-empty JSON list of conversation records")
    return records


def tokenize_record(record: object, images: Path, tokenizer, where: str) -> Example:
    """One record -> `Example`; `where` names the record in error messages."""
    if not isinstance(record, dict) or "image" not in record or "conversations" not in record:
        raise PrumergeError(f"{where}: a record needs 'image' and 'conversations'")
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise PrumergeError(f"{where}: 'conversations' must alternate human and gpt turns")
    image = images / str(record["image"])
    if not image.is_file():
        raise PrumergeError(f"{where}: image {image} does not exist")
    text: list[int] = []
    targets: list[bool] = []
    answer_start = 0
    for i, turn in enumerate(turns):
        speaker, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if speaker != ("human" if i % 2 == 0 else "gpt") or not isinstance(value, str):
            raise PrumergeError(f"{where}: turn {i} must be from {'human' if i % 2 == 0 else 'gpt'} with a text value")
        if i % 2 == 0:
            ids = tokenizer(value.replace(IMAGE_PLACEHOLDER, "").strip(), add_special_tokens=False)["input_ids"]
        else:
            ids = [*tokenizer(value.strip(), add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            answer_start = len(text)
        text += ids
        targets += [i % 2 == 1] * len(ids)
    return Example(image, text, targets, answer_start)


def load_examples(data_file: Path, images: Path, tokenizer) -> list[Example]:
    """Every record of `data_file`, images resolved under `images`."""
    if not images.is_dir():
        raise PrumergeError(f"image directory {images} does not exist")
    records = read_records(data_file)
    return [tokenize_record(r, images, tokenizer, f"{data_file.name} record {i}") for i, r in enumerate(records)]
