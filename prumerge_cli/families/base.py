"""What every family adapter shares: the score layer's input captured during the tower's own forward, the score
of each token from it, and the interface a patched `generate` calls."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import PrumergeError
from ..models.scores import cls_row, queries_and_keys, received_attention
from ..reducers import TowerSignals
from .layout import ImageLayout, ImageTokens


@contextmanager
def layer_input(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the hidden states `layer` is called with while the block runs (the tower keeps its own path)."""
    seen: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def score_layer_index(feature_layer: int, num_layers: int) -> int:
    """The layer right after the feature layer (whose keys belong to the tokens merged); the last layer for
    last-layer features."""
    return min(feature_layer % (num_layers + 1), num_layers - 1)


def token_scores(layer: nn.Module, hidden: torch.Tensor, cls_query: bool, has_cls: bool):
    """(scores [T, N], keys [T, N, C]) of the patches (a [CLS] token dropped) from the score layer's input: the
    [CLS] row (`cls_query`, PruMerge on CLIP) or the attention each patch receives: q and k projected in the
    layer's own dtype, as its forward projects them, the scores in float32."""
    queries, keys, heads = queries_and_keys(layer, hidden)
    queries, keys = queries.float(), keys.float()
    if cls_query:
        return cls_row(queries[:, :1], keys), keys[:, 1:]
    scores = received_attention(queries, keys, heads)
    return (scores[:, 1:], keys[:, 1:]) if has_cls else (scores, keys)


class FamilyAdapter(abc.ABC):
    """How one host class's images become the tiles a reducer sees and the tokens its LM receives."""

    host: ClassVar[str]
    """The transformers class adapted."""
    mrope: ClassVar[bool] = False
    """3-D rotary positions (Qwen): the kept tokens keep their original ids; `positions` gives them."""
    fixed_tiles: ClassVar[bool] = False
    """Every tile is one square of pixels, reduced alone into a fixed grid (Gemma 3, InternVL): `tile_signals`
    runs them as one batch, and a fixed-shape graph of it exports."""

    def __init__(self, model: Any):
        self.model = model
        self.config = model.config
        if not isinstance(getattr(self.config, "vision_feature_layer", -1), int):
            raise PrumergeError(f"{self.host}: a list of vision feature layers is not supported")

    @property
    def cls_score(self) -> bool:
        """Whether the score is PruMerge's own [CLS] row (else the attention each token receives)."""
        return False

    @property
    def image_token(self) -> int:
        """The placeholder id the processor expands per image token."""
        return self.config.image_token_id

    def tile_signals(self, pixel_values: torch.Tensor, with_scores: bool) -> TowerSignals:
        """Every tile's projected tokens [T, n, D] and (`with_scores`) scores [T, n] and keys [T, n, K], on each
        tile's fixed grid; only where `fixed_tiles`."""
        raise PrumergeError(f"{self.host}: tiles are cut to each image, so there is no batch of fixed tiles")

    @abc.abstractmethod
    def layouts(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, inputs: dict[str, Any],
                with_scores: bool) -> list[ImageLayout]:  # fmt: skip
        """Each image's tiles and layout, in prompt order; consumes the family's image inputs from `inputs`."""

    def pixel_tiles(self, pixel_values: torch.Tensor, layouts: list[ImageLayout]) -> list[torch.Tensor]:
        """Each image's pixel tiles [t, 3, H, W] (the base or only one first) from the processor's batch."""
        counts = [1 + layout.tile_grid[0] * layout.tile_grid[1] if layout.tile_grid else len(layout.tiles)
                  for layout in layouts]  # fmt: skip
        if pixel_values.dim() == 5:
            return [pixel_values[b, :n] for b, n in enumerate(counts)]
        return list(torch.split(pixel_values, counts))

    def image_output(self, images: list[ImageTokens]) -> BaseModelOutputWithPooling:
        """What each image gives the LM, as the host's `mm_encoder_outputs["image"]` takes it."""
        return BaseModelOutputWithPooling(pooler_output=torch.cat([i.tokens for i in images]))

    def generation_inputs(self, input_ids: torch.Tensor) -> dict[str, Any]:
        """Inputs the host derives from the (shortened) prompt, beyond ids and mask."""
        return {}

    def positions(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict[str, Any],
                  images: list[ImageTokens], ids: torch.Tensor) -> torch.Tensor | None:  # fmt: skip
        """The position ids of the shortened prompt `ids` where the family sets them itself (M-RoPE), else None
        (1-D positions: contiguous, or `original_position_ids`)."""
        return None
