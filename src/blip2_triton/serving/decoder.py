"""The LLM-decoder ONNX graph as a callable over a shared, in-place KV cache (names from its spec)."""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from blip2_triton import specs

from .kv_cache import KVCache
from .onnx_graph import ORT_FLOATS, make_session


class DecoderGraph:
    """The graph's float dtype (fp32 or fp16) is read from the file itself, so no caller can get it wrong.

    `compute_lock`: held around every run (see compute_lock.py); None runs freely.
    """

    def __init__(self, path: str | Path, config, threads: int | None = None, providers: list[str] | None = None,
                 compute_lock=None):
        self.session = make_session(path, threads, providers)
        prefix = next(i for i in self.session.get_inputs() if i.name == specs.PREFIX_EMBEDS)
        float_dtype = ORT_FLOATS[prefix.type]
        self.spec = specs.decoder_spec(config, float_dtype)
        self.layers = specs.num_decoder_layers(self.spec)
        past = self.spec.input(specs.past_key(0))
        self.heads, self.head_dim = past.dims[1], past.dims[3]
        self.float_dtype = np.dtype(float_dtype)
        self.embed_dim = self.spec.input(specs.PREFIX_EMBEDS).dims[2]
        self._past_names = [n for i in range(self.layers) for n in (specs.past_key(i), specs.past_value(i))]
        self._present_names = [n for i in range(self.layers) for n in (specs.present_key(i), specs.present_value(i))]
        self._binding, self._bound_key = None, None
        self._lock = threading.Lock()  # the kept binding is per call: one call at a time
        self._compute = compute_lock or contextlib.nullcontext()

    def new_cache(self, slots: int = 1, capacity: int = 64) -> KVCache:
        return KVCache(self.layers, self.heads, self.head_dim, self.float_dtype, slots, capacity)

    def _cache_binding(self, cache_rows: list[np.ndarray]):
        """An IO binding with `cache_rows` bound as both past and present.

        Kept while the same views come back (same memory, same shape: every step between a
        sequence joining or leaving and the cache growing), since binding 2 x layers buffers
        costs more than a tiny model's whole step.
        """
        key = tuple((b.ctypes.data, b.shape) for b in cache_rows)
        if key == self._bound_key:
            return self._binding
        binding = self.session.io_binding()
        binding.bind_output(specs.LOGITS, "cpu")  # first bound, so get_outputs()[0]
        for past, present, buffer in zip(self._past_names, self._present_names, cache_rows):
            if not buffer.flags.c_contiguous or buffer.dtype != self.float_dtype:
                raise ValueError("KV-cache rows must be contiguous views of the decoder's dtype")
            shape = list(buffer.shape)
            # Past and present share the memory: GroupQueryAttention writes the new positions in place.
            binding.bind_input(past, "cpu", 0, self.float_dtype.type, shape, buffer.ctypes.data)
            binding.bind_output(present, "cpu", 0, self.float_dtype.type, shape, buffer.ctypes.data)
        self._binding, self._bound_key = binding, key
        return binding

    def __call__(self, input_ids: np.ndarray, prefix_embeds: np.ndarray | None, attention_mask: np.ndarray,
                 cache_rows: list[np.ndarray]) -> np.ndarray:
        """-> logits [rows, vocab] float32 for the last position; the new positions' keys and values
        are written into `cache_rows` (KVCache.rows views, one per past input), in place.

        attention_mask [rows, T]: 1 on each row's first n positions (its length after this call).
        """
        rows = input_ids.shape[0]
        if prefix_embeds is None:
            prefix_embeds = np.zeros((rows, 0, self.embed_dim), self.float_dtype)
        if cache_rows[0].shape[2] < attention_mask.shape[1]:
            raise ValueError(f"KV cache holds {cache_rows[0].shape[2]} positions, the call needs {attention_mask.shape[1]}")
        # Held in a local until the run ends: the binding may point at their memory.
        feeds = {
            specs.INPUT_IDS: np.ascontiguousarray(input_ids, np.int64),
            specs.PREFIX_EMBEDS: np.ascontiguousarray(prefix_embeds, self.float_dtype),
            specs.ATTENTION_MASK: np.ascontiguousarray(attention_mask, np.int64),
        }
        with self._lock:
            binding = self._cache_binding(cache_rows)
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)  # replaces the previous step's
            with self._compute:
                self.session.run_with_iobinding(binding)
            logits = binding.get_outputs()[0].numpy()  # only the logits: the cache is already in place
        return logits[:, -1, :]
