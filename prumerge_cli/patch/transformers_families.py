"""transformers' any-resolution and pooled families (LLaVA-NeXT, LLaVA-OneVision, InternVL, Gemma 3), patched
as LLaVA is: the model's class is swapped for a subclass of it whose `generate` reduces each image through the
family's adapter (`prumerge_cli.families`), shortens each image's run of placeholders to what the LM receives
(kept tokens plus the newlines the family's rule keeps), and hands those features to the stock generation."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PrumergeError
from ..families.base import FamilyAdapter
from ..families.layout import ImageTokens, reduce_image
from ..reducers import Reducer
from .transformers_llava import original_position_ids, shorten_placeholders, with_caller_prompt


class ReducedFamily:
    """Mixed in front of a host class: `generate` with each image's tokens reduced."""

    _prumerge_adapter: FamilyAdapter
    _prumerge_reducer: Reducer
    _prumerge_scope: str
    _prumerge_positions: str
    _prumerge_counts: list[int]

    def reduced_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                       inputs: dict[str, Any]) -> list[ImageTokens]:  # fmt: skip
        """What the LM receives for each image of the batch, in prompt order."""
        adapter, reducer = self._prumerge_adapter, self._prumerge_reducer
        with torch.no_grad():
            layouts = adapter.layouts(input_ids, pixel_values, inputs, reducer.needs_scores)
            return [reduce_image(layout, reducer, self._prumerge_scope) for layout in layouts]  # type: ignore[arg-type]

    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs: Any):
        if kwargs.get("pixel_values_videos") is not None:
            raise PrumergeError(f"{type(self).__name__}: video inputs are not reduced; unpatch the model for them")
        host = super()
        if pixel_values is None or input_ids is None:
            return host.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,  # type: ignore[misc]
                                 **kwargs)  # fmt: skip
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        adapter = self._prumerge_adapter
        image_inputs = dict(kwargs)
        images = self.reduced_images(input_ids, pixel_values, kwargs)
        self._prumerge_counts = [len(i.tokens) for i in images]  # what the LM received, for callers to report
        pad = self.generation_config.pad_token_id  # type: ignore[attr-defined]
        ids, mask = shorten_placeholders(input_ids, attention_mask, adapter.image_token,
                                         [len(i.tokens) for i in images], 0 if pad is None else pad)  # fmt: skip
        kwargs |= adapter.generation_inputs(ids)
        given = adapter.positions(self, input_ids, attention_mask, image_inputs, images, ids)
        if given is not None:
            kwargs["position_ids"] = given
        elif self._prumerge_positions == "original":
            kwargs["position_ids"] = original_position_ids(ids, mask, adapter.image_token, [i.places for i in images],
                                                           [i.span for i in images])  # fmt: skip
        image = adapter.image_output(images)
        out = host.generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": image}, **kwargs)  # type: ignore[misc]
        return with_caller_prompt(out, input_ids, ids.shape[1])


def patch_family(model: Any, adapter: FamilyAdapter, reducer: Reducer, positions: str, scope: str) -> Any:
    """Swap `model`'s class for `Reduced<Class>` (a subclass of it) with `reducer` applied through `adapter`."""
    host = type(model)
    model.__class__ = type(f"Reduced{host.__name__}", (ReducedFamily, host), {"_prumerge_host": host})
    model._prumerge_adapter, model._prumerge_reducer = adapter, reducer
    model._prumerge_scope, model._prumerge_positions = scope, positions
    return model


def unpatch_family(model: Any) -> Any:
    """Undo `patch_family` (a model that is not patched is returned as it is)."""
    if isinstance(model, ReducedFamily):
        model.__class__ = model._prumerge_host  # type: ignore[attr-defined]
        for name in (
            "_prumerge_adapter",
            "_prumerge_reducer",
            "_prumerge_scope",
            "_prumerge_positions",
            "_prumerge_counts",
        ):
            if hasattr(model, name):
                delattr(model, name)
    return model
