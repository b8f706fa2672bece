"""transformers' `LlavaForConditionalGeneration`, patched: its class is swapped for a thin subclass whose
`generate` reduces each image's visual tokens with a prumerge reducer (on the model's own vision tower and
projector), shortens each image's run of expanded `<image>` placeholders to the tokens it kept, re-pads the batch
on the left and hands the reduced features to the stock generation as pre-computed image features. With
`positions=original` it also passes position ids in which each kept token keeps its patch's position and the text
after an image continues after the image's full span (generation extends them by one a step). The returned
sequences start with the caller's own `input_ids`, so `out[:, inputs["input_ids"].shape[1]:]` is the answer as
with the stock model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..encoder import ReducedVisionEncoder
from ..errors import PrumergeError
from ..models.loading import LoadedModel
from ..reducers import EXTRA_INDEX, Reducer


class ReducedLlava(LlavaForConditionalGeneration):
    """A `LlavaForConditionalGeneration` whose `generate` sees each image's reduced tokens."""

    _prumerge_encoder: ReducedVisionEncoder

    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs: Any):
        if pixel_values is None or input_ids is None:
            return super().generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                    **kwargs)  # fmt: skip
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            reduced = self._prumerge_encoder(pixel_values.to(self.dtype), project=True)
        counts = reduced.lengths.tolist()
        pad = self.generation_config.pad_token_id
        pad = pad if pad is not None else 0
        ids, mask = shorten_placeholders(input_ids, attention_mask, self.config.image_token_id, counts, pad)
        features = [reduced.tokens[b, :n] for b, n in enumerate(counts)]
        image = BaseModelOutputWithPooling(pooler_output=features)
        if reduced.span is not None:  # positions=original
            span = reduced.span
            places = [torch.where(reduced.indices[b, :n] == EXTRA_INDEX, span - 1, reduced.indices[b, :n])
                      for b, n in enumerate(counts)]  # fmt: skip
            kwargs["position_ids"] = original_position_ids(ids, mask, self.config.image_token_id, places,
                                                           [span] * len(counts))  # fmt: skip
        out = super().generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": image}, **kwargs)
        return with_caller_prompt(out, input_ids, ids.shape[1])


def with_caller_prompt(out: Any, input_ids: torch.Tensor, shortened: int) -> Any:
    """`generate`'s output with the caller's own prompt in front of the new tokens."""
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    restored = torch.cat([input_ids, sequences[:, shortened:]], dim=1)
    if isinstance(out, torch.Tensor):
        return restored
    out.sequences = restored
    return out


def shorten_placeholders(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token: int,
                         counts: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each run of `image_token` (one run per image, in order) cut to that image's count; rows left-padded."""
    rows, image = [], 0
    for row, keep in zip(input_ids.tolist(), attention_mask.bool().tolist(), strict=True):
        tokens = [t for t, k in zip(row, keep, strict=True) if k]
        out, i = [], 0
        while i < len(tokens):
            if tokens[i] != image_token:
                out.append(tokens[i])
                i += 1
                continue
            end = i
            while end < len(tokens) and tokens[end] == image_token:
                end += 1
            if image >= len(counts):
                raise PrumergeError("the prompts hold more images than pixel_values")
            out += [image_token] * counts[image]
            image, i = image + 1, end
        rows.append(out)
    if image != len(counts):
        raise PrumergeError(f"pixel_values holds {len(counts)} images but the prompts place {image}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype, device=input_ids.device)
    for b, row in enumerate(rows):
        if row:
            ids[b, width - len(row) :] = torch.tensor(row, dtype=input_ids.dtype)
            mask[b, width - len(row) :] = 1
    return ids, mask


def original_position_ids(ids: torch.Tensor, mask: torch.Tensor, image_token: int, places: list[torch.Tensor],
                          spans: list[int]) -> torch.Tensor:  # fmt: skip
    """Position ids of left-padded rows whose image runs hold tokens at `places` (one tensor per image, in order,
    each token's place among its image's `spans[i]` unreduced positions): what follows an image starts after its
    span; padding gets 0."""
    positions = torch.zeros_like(ids)
    image = 0
    for b in range(ids.shape[0]):
        at, i, row = 0, int((mask[b] == 0).sum()), ids[b].tolist()
        while i < len(row):
            if row[i] != image_token:
                positions[b, i], at, i = at, at + 1, i + 1
                continue
            kept = places[image].to(positions.device)
            positions[b, i : i + len(kept)] = at + kept
            at, i, image = at + spans[image], i + len(kept), image + 1
    return positions


def patch_llava(model: LlavaForConditionalGeneration, reducer: Reducer, positions: str) -> Any:
    """Swap `model`'s class for `ReducedLlava` with `reducer` on its own tower and projector."""
    config = model.config
    if not isinstance(config.vision_feature_layer, int) or config.vision_feature_select_strategy != "default":
        raise PrumergeError("patch needs one vision feature layer and the 'default' (drop CLS) strategy")
    vision_type = config.vision_config.model_type
    family = "siglip" if "siglip" in vision_type else "clip"
    loaded = LoadedModel("llava", family, model.model.vision_tower, model.model.multi_modal_projector,
                         config.vision_feature_layer, None, [])  # fmt: skip
    encoder = ReducedVisionEncoder(loaded, reducer, Path(config.name_or_path or "."), positions=positions)
    model.__class__ = ReducedLlava
    model._prumerge_encoder = encoder
    return model


def unpatch_llava(model: Any) -> Any:
    """Undo `patch_llava` (a model that is not patched is returned as it is)."""
    if isinstance(model, ReducedLlava):
        model.__class__ = LlavaForConditionalGeneration
        del model._prumerge_encoder
    return model
