"""A language model's decoder graph as a callable over a shared, in-place KV cache (names from the specs).

Family-neutral: OPT's and T5's decoders differ only in their other inputs, which the caller names.
Everything about the cache (layers, heads, head width, float dtype) is read from the graph file.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from blip2_triton import specs

from .kv_cache import KVCache
from .onnx_graph import ORT_FLOATS, make_session


class DecoderGraph:
    """`compute_lock`: held around every run (see compute_lock.py); None runs freely."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 compute_lock=None):
        self.session = make_session(path, threads, providers)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        past = inputs[specs.past_key(0)]
        self.heads, self.head_dim = past.shape[1], past.shape[3]
        self.float_dtype = np.dtype(ORT_FLOATS[past.type])
        self.input_dtypes = {name: np.dtype(ORT_FLOATS.get(i.type, "int64")) for name, i in inputs.items()}
        self.input_shapes = {name: i.shape for name, i in inputs.items()}
        self._past_names = [n for i in range(self.layers) for n in (specs.past_key(i), specs.past_value(i))]
        self._present_names = [n for i in range(self.layers) for n in (specs.present_key(i), specs.present_value(i))]
        self._binding, self._bound_key = None, None
        self._lock = threading.Lock()  # the kept binding is per call: one call at a time
        self._compute = compute_lock or contextlib.nullcontext()

    def new_cache(self, slots: int = 1, capacity: int = 64) -> KVCache:
        return KVCache(self.layers, self.heads, self.head_dim, self.float_dtype, slots, capacity)

    def _binding_for(self, cache_rows: list[np.ndarray], pinned: dict[str, np.ndarray]):
        """An IO binding with `cache_rows` bound as both past and present, and `pinned` as inputs.

        Kept while the same views come back (same memory, same shape: every step between a
        sequence joining or leaving and the cache growing), since binding 2 x layers buffers
        costs more than a tiny model's whole step.
        """
        key = tuple((b.ctypes.data, b.shape) for b in (*cache_rows, *pinned.values()))
        if key == self._bound_key:
            return self._binding
        binding = self.session.io_binding()
        binding.bind_output(specs.LOGITS, "cpu")  # first bound, so get_outputs()[0]
        for past, present, buffer in zip(self._past_names, self._present_names, cache_rows):
            self._check_buffer(past, buffer)
            # Past and present share the memory: GroupQueryAttention writes the new positions in place.
            binding.bind_input(past, "cpu", 0, self.float_dtype.type, list(buffer.shape), buffer.ctypes.data)
            binding.bind_output(present, "cpu", 0, self.float_dtype.type, list(buffer.shape), buffer.ctypes.data)
        for name, buffer in pinned.items():
            self._check_buffer(name, buffer)
            binding.bind_input(name, "cpu", 0, self.float_dtype.type, list(buffer.shape), buffer.ctypes.data)
        self._binding, self._bound_key = binding, key
        return binding

    def _check_buffer(self, name: str, buffer: np.ndarray) -> None:
        if not buffer.flags.c_contiguous or buffer.dtype != self.float_dtype:
            raise ValueError(f"{name}: cache buffers must be contiguous views of the decoder's dtype {self.float_dtype}")

    def __call__(self, feeds: dict[str, np.ndarray], cache_rows: list[np.ndarray],
                 pinned: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """-> logits [rows, vocab] float32 for the last position; the new positions' keys and values
        are written into `cache_rows` (KVCache.rows views, one per past input), in place.

        feeds: the graph's other inputs by name (input ids, masks, ...), cast to the graph's dtypes;
        its attention_mask [rows, T] is 1 on each row's first n positions (its length after this call).
        pinned: inputs bound by address like the cache (large, and the same from step to step).
        """
        pinned = pinned or {}
        mask = feeds[specs.ATTENTION_MASK]
        if cache_rows[0].shape[2] < mask.shape[1]:
            raise ValueError(f"KV cache holds {cache_rows[0].shape[2]} positions, the call needs {mask.shape[1]}")
        # Held in a local until the run ends: the binding may point at their memory.
        arrays = {name: np.ascontiguousarray(a, self.input_dtypes[name]) for name, a in feeds.items()}
        with self._lock:
            binding = self._binding_for(cache_rows, pinned)
            for name, array in arrays.items():
                binding.bind_cpu_input(name, array)  # replaces the previous step's
            with self._compute:
                self.session.run_with_iobinding(binding)
            logits = binding.get_outputs()[0].numpy()  # only the logits: the cache is already in place
        return logits[:, -1, :]
