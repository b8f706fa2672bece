"""Hand reduced visual tokens to a LLaVA language model: per-sample `<s> image text` sequences, right-padded,
with the positions the tokens ask for (`lm.positions`: contiguous as upstream LLaVA does, or each patch's own)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..reducers import ReducedTokens
from .positions import row_positions

IGNORE = -100


@dataclass
class LmBatch:
    """Inputs for the LM: embeddings, mask, positions; `last[b]` is the last position of row b, and `labels`
    (each target placed at the position that predicts it) is set when targets were given."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    last: torch.Tensor
    labels: torch.Tensor | None

    @property
    def next_position(self) -> torch.Tensor:
        """[B] position id of the token after each row's last."""
        return self.position_ids.gather(1, self.last[:, None])[:, 0] + 1


def splice(
    embed: nn.Embedding,
    bos_id: int,
    image: ReducedTokens,
    texts: list[list[int]],
    targets: list[list[bool]] | None = None,
    prefixes: list[list[int]] | None = None,
) -> LmBatch:
    """Build the batch; `image.tokens` must already be in the LM's embedding space (projected).

    `targets[b][j]` marks text token j of row b as a training target (e.g. the answer words and `</s>`).
    `prefixes[b]` are text tokens between `<s>` and the image (a chat template's "USER: ").
    """
    device = image.tokens.device
    rows, labels, lasts, positions = [], [], [], []
    for b, text in enumerate(texts):
        ids = torch.tensor(text, dtype=torch.long, device=device)
        before = torch.tensor([bos_id, *(prefixes[b] if prefixes else [])], dtype=torch.long, device=device)
        n_img = int(image.lengths[b]) + len(before) - 1
        rows.append(torch.cat([embed(before), image.tokens[b, : int(image.lengths[b])].to(embed.weight.dtype),
                               embed(ids)]))  # fmt: skip
        positions.append(row_positions(len(before), image.indices[b, : int(image.lengths[b])], len(text), image.span))
        lasts.append(len(rows[-1]) - 1)
        label = torch.full((len(rows[-1]),), IGNORE, dtype=torch.long, device=device)
        if targets is not None:
            wanted = torch.tensor(targets[b], dtype=torch.bool, device=device)
            label[n_img : n_img + len(text)] = torch.where(wanted, ids, IGNORE)
        labels.append(label)
    width = max(len(r) for r in rows)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
    embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    position_ids = torch.nn.utils.rnn.pad_sequence(positions, batch_first=True)
    padded = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE)
    return LmBatch(embeds, mask.long(), position_ids, torch.tensor(lasts, device=device), padded if targets else None)
