"""`Qwen2_5_VLForConditionalGeneration`: dynamic-resolution images, window attention, a 2x2 `PatchMerger`, M-RoPE.

- Score: the attention each patch receives in the last vision block, averaged over heads and the queries of its
  attention span (the whole image in a full-attention block, its window otherwise), recomputed from that block's
  input, its q/k projections and rotary embedding alone (the tower keeps its SDPA/FlashAttention path); taken
  back from the window order to raster order and averaged over each 2x2 merge group.
- Where: on the merged tokens the LM sees, each image on its own grid (`image_grid_thw`), so every image of a
  batch has its own grid and kept count. A kept token's merge is a weighted sum of merged tokens (LM space); its
  key is its four patches' keys side by side (before the rotary embedding).
- Budget scope: one tile per image.
- Newlines: none.
- Positions: always the original 3-D (t, h, w) ids: the stock generation's position ids of the unreduced prompt,
  the columns of the kept tokens and of the text kept, so that the text after an image continues exactly as in
  the unreduced sequence and decoding goes on from there; `contiguous` is refused. Video inputs are refused.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from ..errors import PrumergeError
from ..models.scores import received_attention
from .base import FamilyAdapter
from .layout import ImageLayout, ImageTokens, Tile


class BlockInput:
    """Collects the hidden states and keyword arguments a block is called with (its attention spans and rotary
    embedding), while the tower runs its own path."""

    def __init__(self, block: torch.nn.Module):
        self.block = block
        self.seen: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def __enter__(self) -> BlockInput:
        def keep(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.seen.append((args[0] if args else kwargs["hidden_states"], kwargs))

        self.handle = self.block.register_forward_pre_hook(keep, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


class Qwen25VLAdapter(FamilyAdapter):
    host: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    mrope: ClassVar[bool] = True

    def __init__(self, model: Any):
        super().__init__(model)
        self.visual = model.model.visual
        self.block = self.visual.blocks[-1]
        self.merge = self.visual.spatial_merge_size

    def layouts(self, input_ids, pixel_values, inputs, with_scores):
        grid = inputs.pop("image_grid_thw", None)
        if grid is None:
            raise PrumergeError(f"{self.host}: the image inputs need image_grid_thw, as the processor gives them")
        with BlockInput(self.block) as block_input:
            out = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid)
        sizes = (grid.prod(-1) // self.merge**2).tolist()
        side = self.side_features(out, sizes)
        tokens = torch.split(out.pooler_output, sizes)
        scores: list[Any] = [None] * len(sizes)
        keys: list[Any] = [None] * len(sizes)
        if with_scores:
            found = self.scores(*block_input.seen[0], grid)
            scores, keys = torch.split(found[0], sizes), torch.split(found[1], sizes)
        layouts = []
        for (t, h, w), x, s, k in zip(grid.tolist(), tokens, scores, keys, strict=True):
            rows, cols = t * h // self.merge, w // self.merge
            cells = torch.arange(len(x))
            tile = Tile(x, s, k, (rows, cols), cells, torch.zeros(len(x), dtype=torch.long), cells)
            layouts.append(ImageLayout([tile], len(x), (rows, cols), side=side.pop(0) if side else None))
        return layouts

    def side_features(self, out: Any, sizes: list[int]) -> list[dict[str, torch.Tensor]]:
        """Per image, the per-token features the LM takes beside the tokens (none here)."""
        return []

    def scores(self, hidden: torch.Tensor, kwargs: dict[str, Any], grid: torch.Tensor):
        """(scores [M], keys [M, 4C]) of every merged token of the batch, in raster order, from the last block's
        input (window order), its attention spans and rotary embedding."""
        attn = self.block.attn
        z = self.block.norm1(hidden).float()
        qkv = torch.nn.functional.linear(z, attn.qkv.weight.float(), attn.qkv.bias.float())
        q, k, _ = qkv.reshape(len(z), 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        keys = k.flatten(1)
        cos, sin = kwargs["position_embeddings"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos.float(), sin.float())
        bounds = kwargs["cu_seqlens"].tolist()
        received = torch.cat([received_attention(q[None, s:e].flatten(2), k[None, s:e].flatten(2), attn.num_heads)[0]
                              for s, e in itertools.pairwise(bounds)])  # fmt: skip
        back = self.raster_order(grid)
        unit = self.merge**2
        return received.view(-1, unit).mean(-1)[back], keys.reshape(-1, unit * keys.shape[-1])[back]

    def pixel_tiles(self, pixel_values, layouts):
        """Each image as one picture [1, 3, H, W] at its processed resolution, from the processor's flattened
        patches (rows: merge blocks, then the 2x2 inside; columns: channel, time, patch row, patch column)."""
        config = self.visual.config
        side, merge, frames = config.patch_size, self.merge, config.temporal_patch_size
        pictures, start = [], 0
        for layout in layouts:
            rows, cols = layout.token_grid
            count = rows * cols * merge * merge
            patches = pixel_values[start : start + count].view(rows, cols, merge, merge, 3, frames, side, side)[
                ..., 0, :, :
            ]
            picture = patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, rows * merge * side, cols * merge * side)
            pictures.append(picture[None])
            start += count
        return pictures

    def raster_order(self, grid: torch.Tensor) -> torch.Tensor:
        """Where each merge group of the raster order stands in the tower's window order."""
        config = self.visual.config
        window_index, _ = get_vision_window_index(grid, self.merge, config.window_size, config.patch_size)
        return torch.argsort(window_index)

    def image_output(self, images):
        return BaseModelOutputWithPooling(pooler_output=[i.tokens for i in images])

    def generation_inputs(self, input_ids):
        return {"mm_token_type_ids": (input_ids == self.image_token).int()}

    def positions(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict[str, Any],
                  images: list[ImageTokens], ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The stock generation's [4, B, L] position ids of the unreduced prompt, cut to the shortened prompt's
        columns: every text token, and each image's kept tokens (a merged extra token at its image's last)."""
        full = model._prepare_position_ids_for_generation(input_ids, {
            "input_ids": input_ids, "attention_mask": attention_mask, "image_grid_thw": inputs["image_grid_thw"],
            "mm_token_type_ids": (input_ids == self.image_token).int()})  # fmt: skip
        out = torch.zeros(full.shape[0], *ids.shape, dtype=full.dtype, device=full.device)
        image = 0
        for b in range(input_ids.shape[0]):
            row, keep = input_ids[b].tolist(), attention_mask[b].bool().tolist()
            columns, i = [], 0
            while i < len(row):
                if not keep[i]:
                    i += 1
                elif row[i] != self.image_token:
                    columns.append(i)
                    i += 1
                else:
                    columns += (i + images[image].places.clamp(max=images[image].span - 1)).tolist()
                    i, image = i + images[image].span, image + 1
            out[:, b, ids.shape[1] - len(columns) :] = full[:, b, columns]
        return out
