"""Global-memory reads of a Triton kernel, counted while it runs under Triton's interpreter (TRITON_INTERPRET=1):
every masked-in element of every `tl.load`, as bytes requested (what the kernel asks the memory system for, L2
hits included) and as distinct bytes (each address once: the compulsory traffic), to compare with the bytes its
inputs need at the least."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Reads:
    """Bytes a kernel read: all requests, and distinct addresses."""

    requested: int = 0
    addresses: set[int] = field(default_factory=set)
    itemsizes: dict[int, int] = field(default_factory=dict)

    @property
    def distinct(self) -> int:
        """Bytes at distinct addresses."""
        return sum(self.itemsizes[a] for a in self.addresses)


@contextlib.contextmanager
def count_reads() -> Iterator[Reads]:
    """Count the loads of kernels launched inside the block (the interpreter must be on)."""
    from triton.runtime import interpreter

    if not hasattr(interpreter, "InterpreterBuilder"):
        raise RuntimeError("counting reads needs Triton's interpreter (TRITON_INTERPRET=1)")
    builder = interpreter.InterpreterBuilder
    original = builder.create_masked_load
    reads = Reads()

    def counted(self, ptrs, mask, other, cache_policy, is_volatile):
        itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        addresses = np.broadcast_to(ptrs.data, mask.data.shape)[mask.data.astype(bool)]
        reads.requested += addresses.size * itemsize
        for address in np.unique(addresses).tolist():
            reads.addresses.add(address)
            reads.itemsizes[address] = itemsize
        return original(self, ptrs, mask, other, cache_policy, is_volatile)

    builder.create_masked_load = counted
    try:
        yield reads
    finally:
        builder.create_masked_load = original
