"""Ask a family bundle's model (its transformers class, patched with the bundle's reducer) about images, with the
checkpoint's own processor and chat template: the `prumerge generate` path for LLaVA-NeXT, OneVision, InternVL
and Gemma 3."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..bundle import load
from ..errors import PrumergeError
from ..generate import Answer, Decoding
from .model import FamilyEncoder


class TokenClock:
    """A generation streamer: the time of each `put` (the prompt first, then one per new token), and row 0's new
    tokens handed to `on_token`."""

    def __init__(self, on_token: Callable[[int], None] | None):
        self.on_token = on_token
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) > 1 and self.on_token is not None:
            self.on_token(int(value.reshape(-1)[0]))

    def end(self) -> None:
        """Generation finished."""


class FamilyAsker:
    """A family bundle's patched model (with every token: `every_token`) and its processor, on one device."""

    def __init__(self, bundle: Path, device: torch.device, model_dir: Path | None = None, full_hash: bool = False,
                 every_token: bool = False):  # fmt: skip
        from transformers import AutoProcessor

        import prumerge_cli

        encoder = load(bundle, model_dir=model_dir, full_hash=full_hash)
        assert isinstance(encoder, FamilyEncoder)
        try:
            self.processor = AutoProcessor.from_pretrained(str(encoder.model_dir), local_files_only=True)
        except (OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
            reason = " ".join(str(exc).split())[:160]
            raise PrumergeError(f"transformers cannot build {encoder.model_dir}'s processor here ({reason}); "
                                "generate needs it to place the image tokens") from None  # fmt: skip
        if getattr(self.processor, "chat_template", None) is None:
            raise PrumergeError(f"{encoder.model_dir} has no chat template; generate needs it to build prompts")
        self.processor.tokenizer.padding_side = "left"
        self.model = encoder.model.hf_model.to(device)
        prumerge_cli.patch(self.model, "none" if every_token else bundle)
        self.device = device

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer."""
        return self.processor.tokenizer

    def ask(self, images: list[Image.Image], questions: list[str], decoding: Decoding,
            on_token: Callable[[int], None] | None = None) -> list[Answer]:  # fmt: skip
        """Answer each (image, question) pair, batched; `on_token(id)` sees row 0's tokens as they come."""
        turns = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
        texts = [self.processor.apply_chat_template(turn, add_generation_prompt=True) for turn in turns]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.device)
        clock = TokenClock(on_token)
        sampling = {"do_sample": False} if decoding.temperature == 0 else {
            "do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p}  # fmt: skip
        torch.manual_seed(decoding.seed)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=decoding.max_new_tokens, streamer=clock, **sampling)
        new = out[:, inputs["input_ids"].shape[1] :]
        eos = self.tokenizer.eos_token_id
        answers = []
        for b, row in enumerate(new.tolist()):
            ids = row[: row.index(eos)] if eos in row else row
            ids = [t for t in ids if t != self.tokenizer.pad_token_id]
            prefill = clock.times[1] - clock.times[0] if len(clock.times) > 1 else 0.0
            steps = len(clock.times) - 2
            decode = (clock.times[-1] - clock.times[1]) / steps if steps > 0 else 0.0
            answers.append(Answer(self.tokenizer.decode(ids, skip_special_tokens=True), ids,
                                  self.model._prumerge_counts[b], prefill, decode))  # fmt: skip
        return answers
