"""KV caches for sparse decoding. Layers below the sparse layer keep every token, layers from it on keep only
the tokens the output predictor kept. Each group has one counter per sample; a token is written at its group's
counter and the counter advances only if the token is kept (commit-or-overwrite).

- `PagedKVCache` (eager generation): fixed-size blocks handed to each sample as its counter needs them, so the
  memory held is what was kept, rounded up to a block per sample and layer.
- `SparseKVCache` (the exported decode step): static `[B, Hkv, S, D]` buffers, as ONNX and TensorRT need."""

from __future__ import annotations

import torch

BLOCK_TOKENS = 16
"""Tokens per block of the paged cache (vLLM's default)."""


class _Counters:
    """The two commit counters and the masks they give."""

    def __init__(self, batch: int, sparse_layer: int, device: torch.device | str):
        self.sparse_layer = sparse_layer
        self.dense = torch.zeros(batch, dtype=torch.long, device=device)
        self.sparse = torch.zeros(batch, dtype=torch.long, device=device)

    def counter(self, layer_idx: int) -> torch.Tensor:
        """Committed slots per sample in the group of `layer_idx`."""
        return self.dense if layer_idx < self.sparse_layer else self.sparse

    def decode_mask(self, sparse: bool) -> torch.Tensor:
        """`[B, 1, 1, W]` mask of one new token: committed slots and its own slot."""
        counter = self.sparse if sparse else self.dense
        width = int(counter.max()) + 1
        return (torch.arange(width, device=counter.device)[None, :] <= counter[:, None])[:, None, None, :]

    def commit(self, dense: torch.Tensor, sparse: torch.Tensor) -> None:
        """Advance the counters by `dense[b]` / `sparse[b]` committed tokens."""
        self.dense += dense.to(self.dense.dtype)
        self.sparse += sparse.to(self.sparse.dtype)


class SparseKVCache(_Counters):
    """Per-layer `[B, Hkv, S, D]` key/value buffers; `dense[b]` / `sparse[b]` count the committed slots.

    `LlamaAttention` calls `update`; the decoder loop commits with `commit` after each step."""

    def __init__(self, batch: int, layers: int, sparse_layer: int, kv_heads: int, head_dim: int, dense_slots: int,
                 sparse_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu"):  # fmt: skip
        super().__init__(batch, sparse_layer, device)

        def buffer(slots: int) -> torch.Tensor:
            return torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device)

        sizes = [dense_slots if i < sparse_layer else sparse_slots for i in range(layers)]
        self.keys = [buffer(s) for s in sizes]
        self.values = [buffer(s) for s in sizes]

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


class _BlockTable:
    """Which pool blocks hold each sample's slots, for one group of layers (they share the counters)."""

    def __init__(self, batch: int, device: torch.device | str):
        self.rows: list[list[int]] = [[] for _ in range(batch)]
        self.used = 0
        self.device = device

    def reserve(self, last_slot: torch.Tensor) -> int:
        """Hand out blocks so that each sample b has slots 0..last_slot[b]; returns the blocks now in use."""
        for row, last in zip(self.rows, last_slot.tolist(), strict=True):
            while len(row) * BLOCK_TOKENS <= last:
                row.append(self.used)
                self.used += 1
        return self.used

    def locate(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of `slots [B, q]`."""
        table = self.table(int(slots.max()) // BLOCK_TOKENS + 1)
        return table.gather(1, slots // BLOCK_TOKENS), slots % BLOCK_TOKENS

    def table(self, blocks: int) -> torch.Tensor:
        """`[B, blocks]` block ids (block 0 where a sample has fewer; the mask hides those slots)."""
        padded = [row[:blocks] + [0] * (blocks - len(row[:blocks])) for row in self.rows]
        return torch.tensor(padded, dtype=torch.long, device=self.device)


class PagedKVCache(_Counters):
    """Keys and values in per-layer pools of `[BLOCK_TOKENS, Hkv, D]` blocks; a pool grows (by the blocks it
    lacks) only when a sample's counter crosses into a block it does not hold yet."""

    def __init__(self, batch: int, layers: int, sparse_layer: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):  # fmt: skip
        super().__init__(batch, sparse_layer, device)
        self.tables = (_BlockTable(batch, device), _BlockTable(batch, device))
        empty = lambda: torch.zeros(0, BLOCK_TOKENS, kv_heads, head_dim, dtype=dtype, device=device)  # noqa: E731
        self.keys = [empty() for _ in range(layers)]
        self.values = [empty() for _ in range(layers)]

    def _table(self, layer_idx: int) -> _BlockTable:
        return self.tables[int(layer_idx >= self.sparse_layer)]

    def _grow(self, layer_idx: int, blocks: int) -> None:
        for pools in (self.keys, self.values):
            pool = pools[layer_idx]
            if pool.shape[0] < blocks:
                more = pool.new_zeros(blocks - pool.shape[0], *pool.shape[1:])
                pools[layer_idx] = torch.cat([pool, more])

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, ...]:
        """Write `[B, Hkv, q, D]` at slots counter..counter+q-1 of each sample; return the visible slots
        `[B, Hkv, W, D]` of every sample (gathered from its blocks)."""
        q = key.shape[2]
        slots = self.counter(layer_idx)[:, None] + torch.arange(q, device=key.device)
        table = self._table(layer_idx)
        self._grow(layer_idx, table.reserve(slots[:, -1]))
        block, offset = table.locate(slots)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[block.flatten(), offset.flatten()] = key.transpose(1, 2).flatten(0, 1).to(keys.dtype)
        values[block.flatten(), offset.flatten()] = value.transpose(1, 2).flatten(0, 1).to(values.dtype)
        width = int(slots.max()) + 1
        ids = table.table(-(-width // BLOCK_TOKENS))
        return self._gather(keys, ids, width), self._gather(values, ids, width)

    @staticmethod
    def _gather(pool: torch.Tensor, ids: torch.Tensor, width: int) -> torch.Tensor:
        b, n = ids.shape
        if b == 1:  # one sample holds blocks 0..n-1 in order: a view, no copy
            tokens = pool[:n].view(1, n * BLOCK_TOKENS, *pool.shape[2:])
        else:  # one copy: [B, n * BLOCK, H, D]
            tokens = pool[ids.flatten()].view(b, n * BLOCK_TOKENS, *pool.shape[2:])
        return tokens[:, :width].transpose(1, 2)

    def key_at(self, layer_idx: int, row: int, slot: int) -> torch.Tensor:
        """`[Hkv, D]` key stored at `slot` of sample `row` in layer `layer_idx`."""
        block = self._table(layer_idx).rows[row][slot // BLOCK_TOKENS]
        return self.keys[layer_idx][block, slot % BLOCK_TOKENS]

    def allocated_bytes(self) -> int:
        """Bytes of every key and value pool: the memory the cache holds."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
