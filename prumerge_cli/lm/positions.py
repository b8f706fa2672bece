"""Position ids of reduced visual tokens in the LM: `contiguous` (upstream LLaVA and PruMerge: the k kept tokens
take the k positions after the text before the image) or `original` (each token keeps its patch's position, so
the LM sees the same geometry as with every token; the text continues after the full image span)."""

from __future__ import annotations

import torch

from ..errors import PrumergeError
from ..reducers.base import EXTRA_INDEX

POSITIONS = ("contiguous", "original")
DEFAULT_POSITIONS = "original"
"""The geometry the LM was trained on: the embedded LLaVA scores about 19 points higher with original positions
(its model card, `zoo/MODEL_CARD.md`, has the current figures); upstream checkpoints converted by `prumerge
convert` keep the contiguous positions they were trained with."""
POSITIONS_HELP = "'original' (each token at its patch's place) or 'contiguous' (upstream, 1..k)."


def check_positions(positions: str) -> str:
    """`positions` if it is a known setting, else a `PrumergeError`."""
    if positions not in POSITIONS:
        raise PrumergeError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
    return positions


def row_positions(before: int, indices: torch.Tensor, text: int, span: int | None) -> torch.Tensor:
    """Position ids of one `<s> prefix image text` row: `before` tokens, the image tokens whose patch indices are
    `indices`, then `text` tokens. With `span` (the full image's patch count) a patch keeps position
    `before + patch`, the merged extra token shares the last patch's position (`before + span - 1`) and the text
    starts at `before + span`; without it every position is contiguous."""
    device = indices.device
    if span is None:
        return torch.arange(before + len(indices) + text, device=device)
    patches = torch.where(indices == EXTRA_INDEX, span - 1, indices)
    return torch.cat([torch.arange(before, device=device), before + patches,
                      before + span + torch.arange(text, device=device)])  # fmt: skip


def manifest_span(manifest: dict) -> int | None:
    """`ReducedTokens.span` of an export's outputs: its patch count under `positions=original` (exports before the
    setting are contiguous)."""
    return manifest["num_patches"] if manifest.get("positions") == "original" else None
