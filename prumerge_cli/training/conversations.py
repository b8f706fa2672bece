"""Training data in LLaVA's conversation JSON format (mix665k style): records with one image (or none) and
alternating human/gpt turns. Text-only records are trained as text, or skipped as the official Dynamic-LLaVA
data loader does (`requires_image=True`). Two conversation templates:

- `plain` (the embedded model's): `<s> <image> q1 a1 </s> q2 a2 </s> ...`;
- `vicuna_v1` (LLaVA-1.5's): `<s> SYSTEM USER: <image>\\n q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>...`.

The loss is on the answers and their `</s>`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import PrumergeError

IMAGE_PLACEHOLDER = "<image>"
TEMPLATES = ("plain", "vicuna_v1")
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Example:
    """Token ids after the image, which of them are targets, where the final answer starts, and the template's
    tokens between `<s>` and the image."""

    image: Path | None
    text: list[int]
    targets: list[bool]
    answer_start: int
    prefix: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Dataset:
    """The usable examples, how many are text only (left out when skipped), and how many were left out for a
    missing or unreadable image."""

    examples: list[Example]
    text_only: int = 0
    missing_images: int = 0


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


def _turn_pieces(template: str, index: int, value: str) -> str:
    """The text a human turn (even index) or a gpt turn (odd index) contributes after the image."""
    if index % 2:
        return value.strip() if template == "plain" else " " + value.strip()
    question = value.replace(IMAGE_PLACEHOLDER, "").strip()
    if template == "plain":
        return question
    return ("\n" if index == 0 else "USER: ") + question + " ASSISTANT:"


def resolve_template(template: str, tokenizer) -> str:
    """`template`, or for `auto` the one the checkpoint's chat template renders: none, or one that writes just the
    image and the question after `<s>` (the embedded model's), is the plain template; one whose user turn reads
    "USER: ..." is vicuna_v1; any other is refused (name one with --template)."""
    if template != "auto":
        return template
    if not getattr(tokenizer, "chat_template", None):
        return "plain"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if rendered.removeprefix(tokenizer.bos_token or "") == "<image>Q":
        return "plain"
    if "USER:" in rendered and rendered.rstrip().endswith("ASSISTANT:"):
        return "vicuna_v1"
    raise PrumergeError(f"the checkpoint's chat template is neither plain nor vicuna_v1 ({rendered.strip()[:60]!r}); "
                        f"choose one with --template {'|'.join(TEMPLATES)}")  # fmt: skip


def template_prefix(template: str, tokenizer) -> list[int]:
    """Tokens between `<s>` and the image for `template`."""
    if template not in TEMPLATES:
        raise PrumergeError(f"unknown template {template!r}; choose {' or '.join(TEMPLATES)}")
    if template == "plain":
        return []
    return tokenizer(f"{VICUNA_SYSTEM} USER:", add_special_tokens=False)["input_ids"]


def tokenize_record(record: object, images: Path, tokenizer, where: str, template: str = "plain") -> Example:
    """One record -> `Example` (`image` None for a text-only record); `where` names it in error messages."""
    if not isinstance(record, dict) or "conversations" not in record:
        raise PrumergeError(f"{where}: a record needs 'conversations' (and 'image', unless it is text only)")
    turns = _check_turns(record["conversations"], where)
    text: list[int] = []
    targets: list[bool] = []
    answer_start = 0
    for i, value in enumerate(turns):
        ids = tokenizer(_turn_pieces(template, i, value), add_special_tokens=False)["input_ids"]
        if i % 2:
            ids = [*ids, tokenizer.eos_token_id]
            answer_start = len(text)
        text += ids
        targets += [i % 2 == 1] * len(ids)
    image = images / str(record["image"]) if "image" in record else None
    return Example(image, text, targets, answer_start, template_prefix(template, tokenizer))


def _check_turns(turns: object, where: str) -> list[str]:
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise PrumergeError(f"{where}: 'conversations' must alternate human and gpt turns")
    values = []
    for i, turn in enumerate(turns):
        speaker, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if speaker != ("human" if i % 2 == 0 else "gpt") or not isinstance(value, str):
            raise PrumergeError(f"{where}: turn {i} must be from {'human' if i % 2 == 0 else 'gpt'} with a text value")
        values.append(value)
    return values


def readable_image(path: Path) -> bool:
    """Whether `path` is a file PIL recognises as an image (its header only is read)."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def load_examples(data_file: Path, images: Path, tokenizer, template: str = "plain",
                  skip_missing_images: bool = False, keep_text_only: bool = False) -> Dataset:  # fmt: skip
    """The records of `data_file` (text-only ones if `keep_text_only`), images resolved under `images`. Missing
    or unreadable images are an error naming their count, unless `skip_missing_images` leaves them out."""
    if not images.is_dir():
        raise PrumergeError(f"image directory {images} does not exist")
    records = read_records(data_file)
    examples, texts, bad = [], 0, []
    for i, record in enumerate(records):
        where = f"{data_file.name} record {i}"
        example = tokenize_record(record, images, tokenizer, where, template)
        if example.image is None:
            texts += 1
            if keep_text_only:
                examples.append(example)
        elif readable_image(example.image):
            examples.append(example)
        else:
            bad.append(example.image)
    if bad and not skip_missing_images:
        raise PrumergeError(f"{len(bad)} of {len(records)} records name a missing or unreadable image (first: "
                            f"{bad[0]}); pass --skip-missing-images to train without them")  # fmt: skip
    if not examples:
        raise PrumergeError(f"{data_file} has no record to train on (text-only records: {texts})")
    return Dataset(examples, texts, len(bad))
