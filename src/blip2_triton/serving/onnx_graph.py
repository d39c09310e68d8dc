"""A stateless ONNX graph (vision encoder, Q-Former) run by onnxruntime with named inputs/outputs."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from pathlib import Path

import numpy as np

# onnxruntime's names of the float types a graph may be exported in (--dtype fp32 / fp16).
ORT_FLOATS = {"tensor(float)": "float32", "tensor(float16)": "float16"}

# onnxruntime intra-op threads of every session not given a count (unset: onnxruntime's default, one
# per physical core). `blip2-triton bench --threads N` sets it for the server it starts, so that every
# served model, the in-process pipeline and transformers run the same number of threads.
THREADS_ENV = "BLIP2_TRITON_ORT_THREADS"


def threads_from_env() -> int | None:
    """The thread count THREADS_ENV asks for, or None; ValueError (a load-time error) if it is not a count."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    return int(value)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc malloc_trim; elsewhere nothing).

    onnxruntime frees the graph's parsed protobuf and every weight it replaced by a prepacked copy
    right after it builds a session, but glibc keeps those freed pages in the process: loading a
    graph then held its weights plus those freed pages, where its weights alone are what the session
    still uses (README.md, "Server memory").
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def make_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 spinning: bool = True, prepacking: bool = True):
    """An onnxruntime session; `threads` None takes THREADS_ENV's count, else onnxruntime's default;
    `spinning=False` for graphs run once per request. `prepacking=False`: no prepacked weight
    copies (a graph loaded once for a check, whose weights would otherwise be held twice at load).

    onnxruntime's intra-op threads spin for a while after each run, waiting for more work. That
    pays off for the decoder, whose steps follow each other, but the vision encoder's and the
    Q-Former's threads then spin while the next stage (another session, another process in the
    server) needs those cores: with spinning on everywhere, the Q-Former and the prefill ran much
    slower in-process on base-opt (benchmarks/README.md has the figures).
    """
    import onnxruntime as ort

    threads = threads or threads_from_env()
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    release_free_heap()
    return session


class OnnxGraph:
    """`compute_lock`: held around every run (see compute_lock.py); None runs freely.

    Run once per request batch, so each run gives back what it allocated: onnxruntime's arena
    would otherwise keep the largest batch's activations (batch 16 of the vision encoder or the
    Q-Former) for the life of the process. Shrinking the arena after a run and trimming the heap
    cost little next to the run itself.
    """

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 compute_lock=None):
        import onnxruntime as ort

        self.session = make_session(path, threads, providers, spinning=False)
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._compute = compute_lock or contextlib.nullcontext()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # Float inputs are cast to the graph's own precision: an fp16 export takes fp16 tensors.
        self._casts = {i.name: np.dtype(ORT_FLOATS[i.type]) for i in self.session.get_inputs() if i.type in ORT_FLOATS}

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise KeyError(f"missing graph inputs {sorted(missing)}")
        feed = {n: inputs[n].astype(self._casts[n], copy=False) if n in self._casts else inputs[n] for n in self.input_names}
        with self._compute:
            outputs = self.session.run(self.output_names, feed, self._run_options)
        release_free_heap()
        return dict(zip(self.output_names, outputs))


def run_batched(graph: OnnxGraph, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | Exception]:
    """Many requests' inputs (each with its own batch dimension) -> each one's outputs.

    Requests whose inputs have the same shapes past the batch dimension run as one batch (texts of
    one length, say); others in their own. A failing group answers each of its requests with the
    exception, and the other groups still run.
    """
    groups: dict[tuple, list[int]] = {}
    for i, inputs in enumerate(requests):
        groups.setdefault(tuple(inputs[n].shape[1:] for n in graph.input_names), []).append(i)
    results: list = [None] * len(requests)
    for members in groups.values():
        try:
            outputs = graph(**{n: np.concatenate([requests[i][n] for i in members]) for n in graph.input_names})
        except Exception as e:  # noqa: BLE001 (handed to the caller, one per request)
            for i in members:
                results[i] = e
            continue
        start = 0
        for i in members:
            rows = requests[i][graph.input_names[0]].shape[0]
            results[i] = {n: v[start : start + rows] for n, v in outputs.items()}
            start += rows
    return results
