"""The decoder's KV cache: one set of buffers for all sequences, updated in place by the graph.

Per layer, a key and a value buffer [slots, heads, capacity, head_dim]. A sequence owns a run of
consecutive slots (one per row: beams are rows) and its positions 0..length-1 in them. The engine
keeps its sequences packed from slot 0, so one decoder call covers the prefix [0:rows) of every
buffer: a contiguous view, bound to the graph's past input and present output alike.

Memory: slots x the longest sequence's length (grown by doubling), where separate caches held the
sum of the lengths; the engine releases it all whenever it goes idle. The engine may set a
`ceiling` (slots, positions) that growth never passes: what its admitted sequences can reach at
most, which its byte budget bounds (serving/engine.py).
"""
from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, layers: int, heads: int, head_dim: int, dtype: np.dtype, slots: int = 1, capacity: int = 64):
        self.tensors = 2 * layers
        self.heads, self.head_dim, self.dtype = heads, head_dim, np.dtype(dtype)
        self.initial_capacity = capacity
        self.ceiling: tuple[int, int] | None = None  # (slots, positions) growth stops at
        self.buffers = self._allocate(slots, capacity)

    @property
    def position_bytes(self) -> int:
        """Bytes one row's one cached position takes, over every layer's keys and values."""
        return self.tensors * self.heads * self.head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    @property
    def slots(self) -> int:
        return self.buffers[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def _allocate(self, slots: int, capacity: int) -> list[np.ndarray]:
        # np.zeros maps fresh pages lazily: growing by doubling costs only what is written.
        return [np.zeros((slots, self.heads, capacity, self.head_dim), self.dtype) for _ in range(self.tensors)]

    def reserve(self, slots: int, capacity: int, exact_capacity: bool = False) -> None:
        """Make room for `slots` rows of `capacity` positions, keeping the contents. Grows by
        doubling, so a sequence growing token by token copies its cache O(log n) times;
        `exact_capacity` grows positions to just `capacity` (for buffers written once per request)."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        # Doubling, but never past the ceiling, and never below what is asked or already held.
        top_slots, top_capacity = self.ceiling or (2 * self.slots, 2 * self.capacity)
        if not exact_capacity and capacity > self.capacity:
            capacity = max(capacity, min(2 * self.capacity, top_capacity))
        if slots > self.slots:
            slots = max(slots, min(2 * self.slots, top_slots))
        grown = self._allocate(max(slots, self.slots), max(capacity, self.capacity))
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
        self.buffers = self._allocate(1, self.initial_capacity)
        self.ceiling = None


class EncoderDecoderCache:
    """An encoder-decoder LM's cache: the decoder's self-attention KVCache, and per slot the
    cross-attention keys and values of its request's encoder output with that output's length.

    Slots move and gather together in both, so the engine treats it as one KVCache. The encoder
    part is written once per request (`put_encoded`) and only read by the decoder's steps.
    """

    def __init__(self, decoder: KVCache, encoded: KVCache):
        self.decoder, self.encoded = decoder, encoded
        self.encoder_lengths = np.zeros(decoder.slots, np.int64)

    @property
    def slots(self) -> int:
        return self.decoder.slots

    @property
    def capacity(self) -> int:
        return self.decoder.capacity

    @property
    def ceiling(self) -> tuple[int, int] | None:
        return self.decoder.ceiling

    @ceiling.setter
    def ceiling(self, value: tuple[int, int] | None) -> None:
        """Bounds the decoder's slots and positions; the encoder part follows its slots and is
        sized exactly to the longest encoding."""
        self.decoder.ceiling = value

    @property
    def nbytes(self) -> int:
        return self.decoder.nbytes + self.encoded.nbytes

    def reserve(self, slots: int, capacity: int) -> None:
        self.decoder.reserve(slots, capacity)
        self.encoded.reserve(self.decoder.slots, self.encoded.capacity)
        if len(self.encoder_lengths) < self.decoder.slots:
            self.encoder_lengths = np.pad(self.encoder_lengths, (0, self.decoder.slots - len(self.encoder_lengths)))

    def rows(self, start: int, stop: int) -> list[np.ndarray]:
        return self.decoder.rows(start, stop)

    def put_encoded(self, slot: int, tensors: list[np.ndarray]) -> None:
        """Store one request's cross-attention keys and values ([1, heads, n, d] each) in `slot`."""
        length = tensors[0].shape[2]
        self.encoded.reserve(self.decoder.slots, length, exact_capacity=True)
        for buffer, tensor in zip(self.encoded.buffers, tensors):
            buffer[slot, :, :length] = tensor[0]
        self.encoder_lengths[slot] = length

    def encoded_rows(self, start: int, stop: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Views of slots [start:stop) of the encoder buffers (all their positions: the views stay the
        same from step to step, so the decoder keeps its binding) and their mask [rows, capacity],
        1 on each row's own positions."""
        mask = (np.arange(self.encoded.capacity)[None, :] < self.encoder_lengths[start:stop, None]).astype(np.int64)
        return self.encoded.rows(start, stop), mask

    def move(self, source: int, target: int, rows: int, length: int) -> None:
        self.decoder.move(source, target, rows, length)
        self.encoded.move(source, target, rows, self.encoded.capacity)
        self.encoder_lengths[target : target + rows] = self.encoder_lengths[source : source + rows].copy()

    def gather(self, start: int, parents: np.ndarray, length: int) -> None:
        self.decoder.gather(start, parents, length)
        self.encoded.gather(start, parents, self.encoded.capacity)
        self.encoder_lengths[start : start + len(parents)] = self.encoder_lengths[start + parents]

    def release(self) -> None:
        self.decoder.release()
        self.encoded.release()
        self.encoder_lengths = np.zeros(self.decoder.slots, np.int64)
