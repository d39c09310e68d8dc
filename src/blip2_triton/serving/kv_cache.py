"""The decoder's KV cache: one set of buffers for all sequences, updated in place by the graph.

Per layer, a key and a value buffer [slots, heads, capacity, head_dim]. A sequence owns a run of
consecutive slots (one per row: beams are rows) and its positions 0..length-1 in them. The engine
keeps its sequences packed from slot 0, so one decoder call covers the prefix [0:rows) of every
buffer: a contiguous view, bound to the graph's past input and present output alike.

Memory: slots x the longest sequence's length (rounded up to a power of two), where separate
caches held the sum of the lengths; the engine releases it all whenever it goes idle.
"""
from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, layers: int, heads: int, head_dim: int, dtype: np.dtype, slots: int = 1, capacity: int = 64):
        self.tensors = 2 * layers
        self.heads, self.head_dim, self.dtype = heads, head_dim, np.dtype(dtype)
        self.buffers = self._allocate(slots, capacity)

    @property
    def slots(self) -> int:
        return self.buffers[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def _allocate(self, slots: int, capacity: int) -> list[np.ndarray]:
        # np.zeros maps fresh pages lazily: growing by doubling costs only what is written.
        return [np.zeros((slots, self.heads, capacity, self.head_dim), self.dtype) for _ in range(self.tensors)]

    def reserve(self, slots: int, capacity: int) -> None:
        """Make room for `slots` rows of `capacity` positions, keeping the contents. Grows by
        doubling, so a sequence growing token by token copies its cache O(log n) times."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        grown = self._allocate(max(slots, self.slots * (2 if slots > self.slots else 1)),
                               max(capacity, self.capacity * (2 if capacity > self.capacity else 1)))
        for old, new in zip(self.buffers, grown):
            new[: old.shape[0], :, : old.shape[2]] = old
        self.buffers = grown

    def rows(self, start: int, stop: int) -> list[np.ndarray]:
        """Views of slots [start:stop) of every buffer (contiguous: the graph can update them in place)."""
        return [b[start:stop] for b in self.buffers]

    def move(self, source: int, target: int, rows: int, length: int) -> None:
        """Copy `rows` slots from `source` to `target` (ranges may overlap), positions [0:length)."""
        if source != target:
            for b in self.buffers:
                b[target : target + rows, :, :length] = b[source : source + rows, :, :length]

    def gather(self, start: int, parents: np.ndarray, length: int) -> None:
        """Slots start+i become copies of slots start+parents[i] (beam search reordering its rows)."""
        for b in self.buffers:
            b[start : start + len(parents), :, :length] = b[start + parents, :, :length]

    def release(self) -> None:
        """Drop the memory of an idle engine (a long or wide burst must not pin it forever)."""
        self.buffers = self._allocate(1, 64)
