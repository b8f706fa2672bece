"""The lmms-eval model `prumerge`: `--model prumerge --model_args bundle=DIR[,device=cuda,batch_size=N,dtype=bf16]`
answers `generate_until` tasks with a bundle's reduced tokens (training-free, fine-tuned, Dynamic-LLaVA, or a
family's), batched; under `accelerate launch` each process takes its own GPU and its share of the requests.
Registered through the `lmms_eval.models` entry point (`manifest`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from ..errors import PrumergeError
from ..generate import Answer, Decoding


def manifest() -> ModelManifest:
    """The entry point lmms-eval reads: `prumerge` names this module's model class."""
    return ModelManifest(model_id="prumerge", simple_class_path=f"{__name__}.PrumergeLmms")


def open_asker(bundle: Path, device: torch.device, every_token: bool = False, dtype: str | None = None):
    """The generate path of a bundle (a family's or a LLaVA's), or of its model as the checkpoint has it, with
    every token (`every_token`)."""
    from ..bundle import read_bundle

    if "family" in read_bundle(bundle):
        from ..families.asker import FamilyAsker

        return FamilyAsker(bundle, device, every_token=every_token)
    from ..generate import Asker

    return Asker(bundle, device, every_token=every_token, dtype=dtype)


class PrumergeLmms(lmms):
    """A prumerge bundle as an lmms-eval model (one image per request)."""

    def __init__(self, bundle: str, device: str = "cpu", batch_size: int | str = 1, dtype: str | None = None,
                 every_token: bool = False, **unused: Any) -> None:  # fmt: skip
        super().__init__()
        if unused:
            raise PrumergeError(f"the prumerge model takes bundle, device, batch_size, dtype, every_token; not "
                                f"{', '.join(sorted(unused))}")  # fmt: skip
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # accelerate launch: one process per GPU
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.local_process_index, self.accelerator.num_processes
            device = f"cuda:{self.accelerator.local_process_index}"
        self.asker = open_asker(Path(bundle), torch.device(device), str(every_token).lower() == "true", dtype)
        self.batch_size = int(batch_size)
        self.visual_tokens: list[int] = []

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> PrumergeLmms:
        """`--model_args` over lmms-eval's own `--batch_size`/`--device` (which it always passes)."""
        from lmms_eval import utils

        given = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "device")}
        return cls(**{**given, **utils.simple_parse_args_string(arg_string)})

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled) replies, cut at each request's `until` strings; batches share their settings."""
        replies: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            contexts = [c[0] for c in chunk]
            settings = dict(chunk[0][1])
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            images = [self.image_of(*c[2:]) for c in chunk]
            answers = self.ask(images, contexts, settings, [c[1] for c in chunk])
            for context, answer in zip(contexts, answers, strict=True):
                text = answer.text
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                replies.append(text)
                self.visual_tokens.append(answer.visual_tokens)
                self.cache_hook.add_partial("generate_until", (context, chunk[0][1]), text)
        return replies

    def ask(self, images: list, questions: list[str], settings: dict[str, Any],
            every: list[dict[str, Any]]) -> list[Answer]:  # fmt: skip
        """One batched answer per question; requests of other generation settings are answered apart."""
        if any({k: v for k, v in e.items() if k != "until"} != {k: v for k, v in every[0].items() if k != "until"}
               for e in every):  # fmt: skip
            return [a for i, q, e in zip(images, questions, every, strict=True)
                    for a in self.ask([i], [q], {k: v for k, v in e.items() if k != "until"}, [e])]  # fmt: skip
        temperature = float(settings.get("temperature", 0) or 0) if settings.get("do_sample", False) else 0.0
        decoding = Decoding(int(settings.get("max_new_tokens", 64)), temperature, float(settings.get("top_p", 1.0)))
        return self.asker.ask(images, questions, decoding)

    def image_of(self, doc_to_visual, doc_id: int, task: str, split: str):
        """The one image of a request (the world's questions, and most VQA tasks, ask about one)."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1:
            raise PrumergeError(f"{task}: a request holds {len(visuals)} images; prumerge answers about one")
        return visuals[0].convert("RGB")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Not offered: the bundles' LMs are scored by what they generate."""
        task = requests[0].task_name if requests else "this task"
        raise NotImplementedError(f"{task} is a loglikelihood task; the prumerge model answers generate_until tasks "
                                  "(choose the task's generation variant)")  # fmt: skip

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not offered: one question per image."""
        task = requests[0].task_name if requests else "this task"
        raise NotImplementedError(f"{task} is a multi-round task; the prumerge model answers one question per image")
