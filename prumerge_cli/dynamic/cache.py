"""A KV cache of static buffers for sparse decoding: layers below the sparse layer keep every token, layers
from it on keep only the tokens the output predictor kept. Each group has one counter per sample; a token is
written at its group's counter and the counter advances only if the token is kept (commit-or-overwrite)."""

from __future__ import annotations

import torch


class SparseKVCache:
    """Per-layer `[B, Hkv, S, D]` key/value buffers; `dense[b]` / `sparse[b]` count the committed slots.

    `LlamaAttention` calls `update`; the decoder loop commits with `advance` after each step."""

    def __init__(
        self,
        batch: int,
        layers: int,
        sparse_layer: int,
        kv_heads: int,
        head_dim: int,
        dense_slots: int,
        sparse_slots: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.sparse_layer = sparse_layer

        def buffer(slots: int) -> torch.Tensor:
            return torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device)

        sizes = [dense_slots if i < sparse_layer else sparse_slots for i in range(layers)]
        self.keys = [buffer(s) for s in sizes]
        self.values = [buffer(s) for s in sizes]
        self.dense = torch.zeros(batch, dtype=torch.long, device=device)
        self.sparse = torch.zeros(batch, dtype=torch.long, device=device)

    def counter(self, layer_idx: int) -> torch.Tensor:
        """Committed slots per sample in the group of `layer_idx`."""
        return self.dense if layer_idx < self.sparse_layer else self.sparse

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, ...]:
        """Write `[B, Hkv, q, D]` at slots counter..counter+q-1 of each sample; return the visible buffers."""
        b, h, q, d = key.shape
        slots = self.counter(layer_idx)[:, None] + torch.arange(q, device=key.device)
        capacity = self.keys[layer_idx].shape[2]
        if int(slots.max()) >= capacity:
            raise RuntimeError(f"KV cache full: layer {layer_idx} has {capacity} slots")
        index = slots[:, None, :, None].expand(b, h, q, d)
        self.keys[layer_idx].scatter_(2, index, key.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].scatter_(2, index, value.to(self.values[layer_idx].dtype))
        width = int(slots.max()) + 1
        return self.keys[layer_idx][:, :, :width], self.values[layer_idx][:, :, :width]

    def decode_mask(self, sparse: bool) -> torch.Tensor:
        """`[B, 1, 1, W]` mask of one new token: committed slots and its own slot."""
        counter = self.sparse if sparse else self.dense
        width = int(counter.max()) + 1
        return (torch.arange(width, device=counter.device)[None, :] <= counter[:, None])[:, None, None, :]

    def commit(self, dense: torch.Tensor, sparse: torch.Tensor) -> None:
        """Advance the counters by `dense[b]` / `sparse[b]` committed tokens."""
        self.dense += dense.to(self.dense.dtype)
        self.sparse += sparse.to(self.sparse.dtype)
