"""Ask a compressed model questions about images: a training-free bundle's encoder feeding its LLaVA's LM (greedy
or sampled decoding), or a Dynamic-LLaVA bundle's predictors with their sparse KV cache (greedy), streamed token
by token, with prefill / decode times."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .bundle import load, read_bundle
from .devices import finished, module_device
from .encoder import ReducedVisionEncoder
from .errors import PrumergeError
from .finetune.bundle import REGIME, load_finetuned_lm, regime
from .lm.llava_lm import LlavaLm
from .lm.prompts import prompt_ids
from .lm.splice import splice


@dataclass
class Answer:
    """One answer, the visual tokens its image kept, and the time to the first token and per later token."""

    text: str
    token_ids: list[int]
    visual_tokens: int
    prefill_s: float = 0.0
    decode_s_per_token: float = 0.0


@dataclass(frozen=True)
class Decoding:
    """Greedy at temperature 0; otherwise nucleus sampling with `top_p`, from `seed`."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Asker:
    """A bundle's reduced encoder and its LLaVA's LM (with the predictors of a Dynamic-LLaVA bundle, or the
    adapters and projector of a fine-tuned one), on one device."""

    def __init__(self, bundle: str | Path, device: torch.device = torch.device("cpu"), model_dir: Path | None = None,
                 full_hash: bool = False, every_token: bool = False, dtype: str | None = None):  # fmt: skip
        """`every_token`: the bundle's model as its checkpoint has it, with method none (no predictors, adapters
        or trained projector): what the bundle is measured against; `dtype`: the tower's."""
        self.dynamic = None
        options = {} if dtype is None else {"dtype": dtype}
        record = read_bundle(bundle)
        if every_token:
            from .model_ref import resolve_model, verify_weights

            llava = resolve_model(record["model"], Path(bundle), model_dir)
            self.encoder = ReducedVisionEncoder.from_pretrained(llava, "none", **options)
            verify_weights(record["model"], llava, self.encoder.model.weight_files, full_hash)
            self.lm = LlavaLm.from_pretrained(llava)
        elif record["method"] == "dynamic":
            from .dynamic.bundle import load_dynamic

            self.dynamic, self.encoder = load_dynamic(Path(bundle), model_dir=model_dir, full_hash=full_hash)
            self.lm = self.dynamic.lm
            self.dynamic.predictors.to(device)
        else:
            self.encoder = load(bundle, model_dir=model_dir, full_hash=full_hash, **options)
            if self.encoder.projector is None:
                raise PrumergeError(f"the model of {bundle} is a vision tower alone; generate needs a LLaVA checkpoint")
            if regime(record) == REGIME:  # the adapters in the LM, the trained projector
                self.lm = load_finetuned_lm(bundle, model_dir)
                self.encoder.projector = self.lm.model.model.multi_modal_projector
            else:
                self.lm = LlavaLm.from_pretrained(self.encoder.model_dir)
        self.encoder.to(device)
        self.lm.model.to(device)

    @property
    def tokenizer(self):
        """The LM's tokenizer."""
        return self.lm.tokenizer

    def ask(self, images: list[Image.Image], questions: list[str], decoding: Decoding,
            on_token: Callable[[int], None] | None = None) -> list[Answer]:  # fmt: skip
        """Answer each (image, question) pair, batched; `on_token(id)` sees row 0's tokens as they come."""
        device = module_device(self.encoder)
        with torch.no_grad():
            reduced = self.encoder.encode_images(images, project=True)
            parts = [prompt_ids(self.lm.tokenizer, q) for q in questions]
            steps, times, ended = [], [], torch.zeros(len(images), dtype=torch.bool)
            start = time.perf_counter()
            for token in timed(self.tokens(reduced, parts, decoding), device, times):
                steps.append(token)
                if on_token is not None and not ended[0] and int(token[0]) != self.lm.eos_id:
                    on_token(int(token[0]))
                ended |= token.cpu() == self.lm.eos_id
                if bool(ended.all()):
                    break
        ids = [self.lm.until_eos(row) for row in torch.stack(steps, 1).tolist()]
        if self.dynamic is not None and self.dynamic.vision:  # the image tokens the predictor keeps at prefill
            reduced.lengths = torch.tensor([self.dynamic.config.vision_keep(int(n)) for n in reduced.lengths])
        prefill = times[0] - start
        decode = (times[-1] - times[0]) / max(1, len(times) - 1)
        return [Answer(self.lm.tokenizer.decode(row), row, int(n), prefill, decode)
                for row, n in zip(ids, reduced.lengths.tolist(), strict=True)]  # fmt: skip

    def tokens(self, reduced, parts: list[tuple[list[int], list[int]]], decoding: Decoding) -> Iterator[torch.Tensor]:
        """The next token of every row, step by step."""
        texts = [after for _, after in parts]
        if self.dynamic is not None:
            if decoding.temperature > 0:
                raise PrumergeError("a Dynamic-LLaVA bundle decodes greedily (no --temperature)")
            prefix = parts[0][0]  # the chat template's tokens before the image: the same for every question
            stream = self.dynamic.stream(reduced, texts, decoding.max_new_tokens, prefix=prefix)
            return (token for token, _ in stream)
        batch = splice(self.lm.embed, self.lm.bos_id, reduced, texts, prefixes=[before for before, _ in parts])
        generator = torch.Generator().manual_seed(decoding.seed)
        return self.lm.stream(batch, decoding.max_new_tokens, decoding.temperature, decoding.top_p, generator)


def timed(tokens: Iterator[torch.Tensor], device: torch.device, times: list[float]) -> Iterator[torch.Tensor]:
    """The tokens, noting when each was ready."""
    for token in tokens:
        finished(token, device)
        times.append(time.perf_counter())
        yield token
