"""The README's Python block runs as written on the embedded model, as a new user runs it from the repository's root
after the tour's steps 0 and 1: `AutoProcessor` loads the embedded LLaVA's processor and chat template, and the
patched stock model answers the question."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from transformers import AutoProcessor

import prumerge_cli
from prumerge_cli.zoo import LLAVA_DIR
from prumerge_cli.zoo.world import samples_of

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block() -> str:
    """The README's first Python block."""
    return re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)


def test_the_embedded_processor_writes_the_prompt_the_model_was_trained_on():
    processor = AutoProcessor.from_pretrained(str(LLAVA_DIR))
    sample = samples_of("test", 0, 1)[0]
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.qas[0].question}]}]
    prompt = processor.apply_chat_template(message, add_generation_prompt=True)
    assert prompt == f"<s><image>{sample.qas[0].question}"
    ids = processor(images=sample.image, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    question = tokenizer(sample.qas[0].question, add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.bos_token_id, *[tokenizer.convert_tokens_to_ids("<image>")] * 256, *question]


def test_the_readme_python_block_runs_as_written(tmp_path):
    """In a copy of the layout the block expects (the embedded model at its path, the tour's image and bundle),
    run by a fresh interpreter that imports the installed package, not the folder of that name."""
    (tmp_path / "prumerge_cli" / "zoo").mkdir(parents=True)
    (tmp_path / "prumerge_cli" / "zoo" / "llava").symlink_to(LLAVA_DIR)
    (tmp_path / "photos" / "images").mkdir(parents=True)
    for i, sample in enumerate(samples_of("test", 0, 8)):
        sample.image.save(tmp_path / "photos" / "images" / f"test-{i:07d}.png")
    prumerge_cli.ReducedVisionEncoder.from_pretrained(LLAVA_DIR, "prumerge").save(tmp_path / "bundles" / "prumerge")
    script = tmp_path.parent / f"{tmp_path.name}-readme.py"
    script.write_text(python_block())
    run = subprocess.run([sys.executable, "-P", str(script)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    expected = re.search(r"# (\w+)\n", python_block().split("skip_special_tokens=True))")[1]).group(1)
    keeps, answer = run.stdout.strip().splitlines()
    assert re.fullmatch(r"prumerge\+ keeps \d+ of 256 patches", keeps)
    assert answer.strip() == expected == "blue"
