"""The query embeddings of recent images, so follow-up questions on an image skip the image stages.

A VQA session sends the same image with every question; its preprocessing, vision encoder and
Q-Former runs are most of a short answer's time. The cache maps a hash of the image bytes and
the preprocessing settings to the Q-Former's output [Q, E], least recently used first out, bounded
by the bytes it holds. Concurrent requests for an image not yet cached run the image stages once:
the first computes, the others wait for its result. A failed computation (a corrupt image, a
prompt refused) caches nothing, and each waiter then computes for itself, since the failure may
have been the first request's own prompt.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable

import numpy as np

from blip2_triton.repository import DEFAULT_IMAGE_CACHE_BYTES


def image_key(image: bytes, settings: bytes) -> bytes:
    """The cache key of an encoded image under the preprocessing `settings` (any bytes that
    change when the pixels the processor makes would change)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(len(settings).to_bytes(8, "little"))
    h.update(settings)
    h.update(image)
    return h.digest()


class ImageCacheStats:
    """What the cache reports as it runs; the Triton model subclasses it to export metrics."""

    def __init__(self):
        self.hits = self.misses = self.evictions = 0
        self.bytes = self.entries = 0

    def on_hit(self) -> None:
        self.hits += 1

    def on_miss(self) -> None:
        self.misses += 1

    def on_evict(self, count: int) -> None:
        self.evictions += count

    def on_size(self, nbytes: int, entries: int) -> None:
        self.bytes, self.entries = nbytes, entries


class _Pending:
    """An image being computed by one request while others wait for it."""

    def __init__(self):
        self.done = threading.Event()
        self.value: np.ndarray | None = None


class ImageCache:
    """LRU map key -> query embeddings, bounded by `max_bytes`; thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_IMAGE_CACHE_BYTES, stats: ImageCacheStats | None = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.stats = stats or ImageCacheStats()
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._pending: dict[bytes, _Pending] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get_or_compute(self, key: bytes, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
        """-> (query embeddings, hit). A hit is a value this request did not compute: cached, or
        computed meanwhile by a concurrent request for the same key. `compute`'s exception reaches
        its own caller only."""
        while True:
            with self._lock:
                value = self._entries.get(key)
                if value is not None:
                    self._entries.move_to_end(key)
                    self.stats.on_hit()
                    return value, True
                pending = self._pending.get(key)
                leader = pending is None
                if leader:
                    pending = self._pending[key] = _Pending()
            if leader:
                break
            pending.done.wait()
            if pending.value is not None:
                self.stats.on_hit()
                return pending.value, True
            # The computation failed (maybe on its own prompt): try again, perhaps as the leader.
        self.stats.on_miss()
        try:
            # Owned here (a BLS output may live in memory its response frees) and read-only:
            # every request that hits it shares it.
            value = np.array(compute(), copy=True)
            value.setflags(write=False)
            pending.value = value
            self._insert(key, value)
        finally:
            with self._lock:
                del self._pending[key]
            pending.done.set()
        return value, False

    def _insert(self, key: bytes, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return  # would evict everything and still not fit
        evicted = 0
        with self._lock:
            self._entries[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                evicted += 1
            # Reported under the lock, so the last report is the true size.
            if evicted:
                self.stats.on_evict(evicted)
            self.stats.on_size(self._bytes, len(self._entries))
