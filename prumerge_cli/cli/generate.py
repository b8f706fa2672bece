"""`prumerge generate`: ask a compressed model a question about an image (or many, from a JSONL file)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .. import atomic, devices
from ..errors import PrumergeError
from ..progress import Phases
from . import app, err
from .console import out_console


@app.command()
def generate(
    bundle: Annotated[Path, typer.Argument(help="A bundle of a LLaVA or family checkpoint (prumerge compress).")],
    image: Annotated[Path | None, typer.Option(help="The image to ask about.")] = None,
    prompt: Annotated[str | None, typer.Option(help="The question.")] = None,
    batch: Annotated[
        Path | None, typer.Option(help='JSONL of {"image": PATH, "prompt": TEXT} records to answer instead.')
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="A .jsonl file for the answers (with --batch).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --output file.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Records per forward pass (with --batch).")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 for greedy decoding, else sampling.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus of the sampled distribution.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    device: Annotated[str, typer.Option(help=f"Where the model runs: {devices.HELP}.")] = "cpu",
    model: Annotated[Path | None, typer.Option(help="Where the bundle's model is (default: as recorded).")] = None,
    full_hash: Annotated[bool, typer.Option(help="Check the bundle's model weights by their full hash.")] = False,
) -> None:
    """Ask the compressed model: the answer is streamed as it is generated, then one line with the visual
    tokens kept and the prefill and per-token decode times."""
    from ..generate import Asker, Decoding
    from ..models.images import open_image

    single = image is not None or prompt is not None
    if single == (batch is not None) or (single and (image is None or prompt is None)):
        raise PrumergeError("give --image and --prompt, or --batch FILE.jsonl")
    if batch is not None and output is None:
        raise PrumergeError("--batch needs --output FILE.jsonl for the answers")
    if batch is None and output is not None:
        raise PrumergeError("--output writes the answers of --batch; a single answer is printed")
    atomic.check_file_output(output, force, (".jsonl",))
    where = devices.resolve_device(device)
    records = read_records(batch) if batch is not None else [{"image": str(image), "prompt": prompt}]
    pictures = [open_image(Path(r["image"])) for r in records]
    decoding = Decoding(max_new_tokens, temperature, top_p, seed)
    from ..bundle import read_bundle

    if "family" in read_bundle(bundle):
        from ..families.asker import FamilyAsker

        asker: Asker | FamilyAsker = FamilyAsker(bundle, where, model, full_hash)
    else:
        asker = Asker(bundle, where, model, full_hash)
    tokenizer = asker.tokenizer
    console = out_console()
    for warning in prompt_warnings(tokenizer, [r["prompt"] for r in records], bundle):
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if batch is None:
        shown: list[int] = []

        def show(token: int) -> None:
            before = tokenizer.decode(shown)
            shown.append(token)
            sys.stdout.write(tokenizer.decode(shown)[len(before) :])
            sys.stdout.flush()

        (answer,) = asker.ask(pictures, [prompt], decoding, on_token=show)
        print()
        if not answer.token_ids:
            console.print("[dim](no answer: the model ended its reply at once)[/dim]")
        decode = f"{1000 * answer.decode_s_per_token:.1f} ms/token" if len(answer.token_ids) > 1 else "-"
        console.print(f"[dim]{answer.visual_tokens} visual tokens kept; prefill {1000 * answer.prefill_s:.1f} "
                      f"ms, decode {decode}[/dim]")  # fmt: skip
        return
    lines = []
    with Phases(console) as phases, phases.phase(f"answering {len(records)} prompts", len(records)) as advance:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            answers = asker.ask(pictures[start : start + batch_size], [r["prompt"] for r in chunk], decoding)
            for record, answer in zip(chunk, answers, strict=True):
                lines.append(json.dumps({**record, "answer": answer.text, "visual_tokens": answer.visual_tokens}))
            advance(len(chunk))
    atomic.write_text(output, "\n".join(lines) + "\n")
    console.print(f"wrote {len(lines)} answers to {output}")


def prompt_warnings(tokenizer, prompts: list[str], bundle: Path) -> list[str]:
    """What the model cannot read in the prompts: the words its tokenizer maps to its unknown token (a word-level
    vocabulary, like the embedded model's, knows only its training words); on the embedded model also a question
    mark, which its questions never have, and its question forms."""
    unknown: list[str] = []
    for prompt in prompts:
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        for token, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
            if token == tokenizer.unk_token_id and prompt[begin:end] not in unknown:
                unknown.append(prompt[begin:end])
    warnings = []
    if unknown:
        shown = ", ".join(repr(w) for w in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        warnings.append(f"the model does not know {shown}: its tokenizer reads {'them' if len(unknown) > 1 else 'it'} "
                        f"as {tokenizer.unk_token}")  # fmt: skip
    asks = any("?" in p for p in prompts)
    if not (warnings or asks) or not is_embedded(bundle):  # hash the embedded weights only when there is a hint to give
        return warnings
    if asks:
        warnings.append("the embedded model's questions never end with '?': leave it out")
    if warnings:
        from ..zoo.world import QUESTION_FORMS

        warnings[-1] += "; it answers questions like " + ", ".join(f"'{q}'" for q in QUESTION_FORMS)
    return warnings


def is_embedded(bundle: Path) -> bool:
    """Whether a bundle was written for the embedded LLaVA's weights (wherever its copy lives)."""
    from ..bundle import read_bundle
    from ..models.weights import hash_files, weight_files
    from ..zoo import LLAVA_DIR

    return read_bundle(bundle)["model"].get("sha256") == hash_files(weight_files(LLAVA_DIR))


def read_records(path: Path) -> list[dict]:
    """The JSONL records, each with an image path and a prompt; paths are relative to the file."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise PrumergeError(f"cannot read {path}: {exc}") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise PrumergeError(f"{path}:{number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or "prompt" not in record:
            raise PrumergeError(f'{path}:{number} needs "image" (a path) and "prompt"')
        image = Path(record["image"])
        records.append({**record, "image": str(image if image.is_absolute() else path.parent / image)})
    if not records:
        raise PrumergeError(f"{path} has no records")
    return records
