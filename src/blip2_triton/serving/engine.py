"""Continuous-batching generation over a language model (serving.language_model.LanguageModel).

Each request is prefilled once (query embeddings + prompt) and then joins the running batch: every
step makes ONE batched language-model call for the rows of all active sequences (one row per
sequence, or num_beams rows for beam search). Sequences join and leave between steps, so a new request waits
at most one step, not a whole generation. The KV cache never leaves this process.

All sequences share one cache, packed from slot 0 in admission order; the language model writes
each step's keys and values into it in place. Rows of different lengths share a call: the model
gets each row's own length, so every sequence sees exactly the computation it would see alone.

Bounded memory: with a `kv_budget` (bytes), a request is admitted only if the cache can then hold
every admitted sequence at the most rows and positions it may reach (its beams, its prompt plus
max_new_tokens), and the cache's growth stops there (its ceiling). Requests beyond that wait, in
admission order; with `max_waiting`, `enter()` refuses a request once that many wait already
(errors.ResourceExhausted), so waiting requests cannot pile up either.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .language_model import LanguageModel
from .step_gate import StepGate
from blip2_triton.errors import Cancelled, ResourceExhausted
from blip2_triton.generation import Search

log = logging.getLogger("blip2_triton.engine")


@dataclass
class Request:
    query_embeds: np.ndarray  # [Q, E]
    prompt_ids: np.ndarray  # [S]: BOS + prompt
    search: Search
    stream: bool = False
    # on_tokens(all generated ids, how many are new, final) is called from the engine thread.
    on_tokens: Callable[[list[int], int, bool], None] = lambda ids, new, final: None
    on_error: Callable[[BaseException], None] = lambda e: None
    is_cancelled: Callable[[], bool] = lambda: False
    # time.perf_counter() when the request reached the server: time to first token counts from here.
    # The `blip2` model sets it to when execute() received the request, before the image stages.
    received: float = field(default_factory=time.perf_counter)
    # The most rows (beams) and cache positions (LanguageModel.cache_extent) it can reach: what the
    # engine's budget reserves for it. The defaults reserve nothing (an engine without a budget).
    rows: int = 1
    extent: tuple[int, ...] = ()
    place: "Place | None" = None  # its place in the waiting line (Engine.enter), freed when admitted


class Place:
    """A request's place among the engine's waiting requests, from before its stages run until the
    engine has admitted it (or it failed); `release()` may be called any number of times."""

    def __init__(self, engine: "Engine"):
        self._engine, self._held = engine, True

    def release(self) -> None:
        with self._engine._waiting_changed:
            if self._held:
                self._held = False
                self._engine._places -= 1
                self._engine.stats.on_waiting(self._engine._places)


@dataclass
class _Sequence:
    request: Request
    rows: int  # beams are rows
    length: int  # positions cached per row
    start: int  # first KV-cache slot (the engine keeps sequences packed: see _set_active)
    pending: np.ndarray  # [rows] tokens to feed at the next step
    emitted: int = 0  # tokens already sent to the client
    next_cancel_check: float = 0.0  # time.monotonic() from which to ask is_cancelled() again
    steps: int = 0
    finished: bool = False


# Without a configured budget, the KV cache of the active sequences may take this share of the
# machine's memory (or of the cgroup's limit, when lower): the rest is for the weights, the other
# models' processes and the system. One base-opt request at its context limit takes a few MiB.
DEFAULT_KV_BUDGET_SHARE = 0.25
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def kv_budget(value: str) -> int:
    """A kv_cache_budget setting -> bytes: "auto" (DEFAULT_KV_BUDGET_SHARE of machine_memory()) or
    a size such as "1048576", "512KiB", "64MiB", "2GiB"; ValueError otherwise."""
    if value.strip() == "auto":
        return int(machine_memory() * DEFAULT_KV_BUDGET_SHARE)
    match = _SIZE.match(value)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"kv_cache_budget must be \"auto\" or a positive size such as \"512MiB\", got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


# Stages the engine (and the model around it) times: the prefill call, each batched decode-step
# call (one per step, whatever its rows), and each detokenization of a response's text.
TIMED_STAGES = ("prefill", "decode_step", "detokenize")


class EngineStats:
    """What the engine reports as it runs; the Triton model subclasses it to export metrics."""

    def __init__(self):
        self.tokens = self.steps = self.prefills = self.active = 0
        self.first_token_seconds: list[float] = []

    def on_prefill(self) -> None:
        self.prefills += 1

    def on_step(self, sequences: int) -> None:
        self.steps += 1

    def on_tokens(self, count: int) -> None:
        self.tokens += count

    def on_first_token(self, seconds: float) -> None:
        self.first_token_seconds.append(seconds)

    def on_active(self, sequences: int) -> None:
        self.active = sequences

    def on_waiting(self, requests: int) -> None:
        """Requests holding a place in the waiting line (Engine.enter) now."""

    def on_cache(self, reserved_bytes: int, allocated_bytes: int) -> None:
        """The KV cache the admitted sequences may reach at most, and what its buffers take now."""

    def on_stage(self, stage: str, seconds: float) -> None:
        """One timed run of a TIMED_STAGES stage (the Triton model exports them as metrics)."""

    def flush(self) -> None:
        """Called before a request's last answer goes out: whatever is reported lazily is due."""


class Engine:
    """Continuous batching: every active sequence advances by one batched language-model call per step.

    `cancel_poll_s`: a sequence asks whether its client cancelled at most this often. In Triton
    the question is a round trip to the server; asked every step it costs a tiny model's request
    more than its steps do, while a step of a real model is longer than the interval anyway.
    """

    def __init__(self, language_model: LanguageModel, max_rows: int = 64, stats: EngineStats | None = None,
                 cancel_poll_s: float = 0.01, gate: StepGate | None = None, kv_budget: int | None = None,
                 max_waiting: int | None = None):
        self.language_model = language_model
        self.kv_budget, self.max_waiting = kv_budget, max_waiting
        self.gate = gate  # a test hook: every language-model call waits for it (serving/step_gate.py)
        self.max_rows = max_rows
        self.stats = stats or EngineStats()
        self.cancel_poll_s = cancel_poll_s
        self.cache = language_model.new_cache()
        self._waiting: collections.deque[Request] = collections.deque()
        self._waiting_changed = threading.Condition()
        self._places = 0  # requests between enter() and their admission
        self._active: list[_Sequence] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="blip2-generation", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; every request still active or waiting gets a final CANCELLED answer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for seq in self._active:
            self._fail(seq.request, Cancelled("server shutting down"))
        self._set_active([])
        while True:
            with self._waiting_changed:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
            self._take(request)
            self._fail(request, Cancelled("server shutting down"))

    @property
    def sequences(self) -> int:
        """Sequences being decoded now (what the active-sequences metric reports)."""
        return len(self._active)

    def enter(self) -> Place:
        """A place in the waiting line for a request about to be prepared; ResourceExhausted when
        `max_waiting` requests wait already. Give it to the Request (`place`), or release it."""
        with self._waiting_changed:
            if self.max_waiting is not None and self._places >= self.max_waiting:
                raise ResourceExhausted(f"{self._places} requests are waiting already (this server's "
                                        f"max_queue_size); retry later")
            self._places += 1
            self.stats.on_waiting(self._places)
        return Place(self)

    def check_fits(self, rows: int, extent: tuple[int, ...]) -> None:
        """ResourceExhausted if a request of `rows` rows and `extent` could not fit the KV cache
        budget even alone."""
        if self.kv_budget is not None and extent:
            need = self.language_model.cache_bytes(rows, extent)
            if need > self.kv_budget:
                raise ResourceExhausted(
                    f"this request's KV cache ({rows} rows of up to {extent[0]} positions) needs "
                    f"{need / 2**20:.1f} MiB, more than this server's kv_cache_budget of "
                    f"{self.kv_budget / 2**20:.1f} MiB; ask for fewer beams or max_new_tokens")

    def submit(self, request: Request) -> None:
        with self._waiting_changed:
            self._waiting.append(request)
            self._waiting_changed.notify()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted (they wait for room in the cache)."""
        return len(self._waiting)

    def generate(self, request: Request) -> list[int]:
        """Run one request to completion on the calling thread (tests, benchmarks, no server)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("generate() runs the engine on the calling thread; this engine's loop is running: submit()")
        self.admit(request)
        while self._active:
            self.step()
        return request.search.output_tokens()

    # ---- the loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit_waiting(block=not self._active)
                if self._active:
                    self.step()
            except BaseException as e:  # a bug must cost the active requests, never the model
                log.exception("generation loop error")
                for seq in self._active:
                    self._fail(seq.request, e)
                self._set_active([])

    def _set_active(self, sequences: list[_Sequence]) -> None:
        """Every change of the active set goes through here, so the reported count never goes stale
        and the cache stays packed: sequences move down over the slots of those that left (in
        admission order, so a move never overwrites a sequence not yet moved).

        The count is reported only when it changes: a decode step sets the set twice, and the
        Triton metric behind on_active is a round trip to the server.
        """
        changed = len(sequences) != len(self._active)
        start = 0
        for seq in sequences:
            if seq.start != start:
                self.cache.move(seq.start, start, seq.rows, seq.length)
                seq.start = start
            start += seq.rows
        self._active = sequences
        if not sequences:
            self.cache.release()
        elif self.kv_budget is not None:
            self.cache.ceiling = self._ceiling(sequences)
        if changed:
            self.stats.on_active(len(sequences))
            self.stats.on_cache(self._reserved(sequences), self.cache.nbytes)

    @staticmethod
    def _worst(requests: list[Request]) -> tuple[int, tuple[int, ...]]:
        """(rows, extent) of a cache that holds every one of these requests at its most."""
        rows = sum(r.rows for r in requests)
        extents = [r.extent for r in requests if r.extent]
        return rows, tuple(max(parts) for parts in zip(*extents)) if extents else ()

    def _reserved(self, sequences: list[_Sequence]) -> int:
        rows, extent = self._worst([s.request for s in sequences])
        return self.language_model.cache_bytes(rows, extent) if extent else 0

    def _ceiling(self, sequences: list[_Sequence]) -> tuple[int, int] | None:
        rows, extent = self._worst([s.request for s in sequences])
        return (rows, extent[0]) if extent else None

    def _fits(self, request: Request) -> bool:
        """Would the cache, with this request admitted, stay within the rows and the byte budget?"""
        rows = sum(s.rows for s in self._active)
        if self._active and rows + request.rows > self.max_rows:
            return False
        if self.kv_budget is None or not request.extent or not self._active:
            return True  # alone it fits: Generator.validate checked it against the budget
        worst_rows, extent = self._worst([s.request for s in self._active] + [request])
        return self.language_model.cache_bytes(worst_rows, extent) <= self.kv_budget

    def _take(self, request: Request) -> None:
        if request.place is not None:
            request.place.release()

    def _admit_waiting(self, block: bool) -> None:
        """Admit waiting requests, oldest first, while they fit (the rows and the KV cache budget);
        the first that does not fit waits, and the ones behind it wait too."""
        while True:
            with self._waiting_changed:
                if not self._waiting and block:
                    self._waiting_changed.wait(0.05)
                if not self._waiting or not self._fits(self._waiting[0]):
                    return
                request = self._waiting.popleft()
            block = False
            self.admit(request)
            self._take(request)  # only now: a request being admitted still counts as waiting

    def admit(self, request: Request) -> None:
        """Prefill one request and take its first token.

        admit() and step() drive the engine on the calling thread; only generate() and tests call
        them, and only while the loop is not running (the cache belongs to one thread).

        The sequence counts as active before its first token goes out: a client that has a token
        in hand must see its sequence in the active count (it is reported synchronously).
        """
        seq = None
        if self.gate is not None:
            self.gate.wait(self._stop, self._drop_cancelled)
        try:
            if request.is_cancelled():
                raise Cancelled("cancelled before start")
            start = sum(s.rows for s in self._active)
            began = time.perf_counter()
            logits, length = self.language_model.prefill(request.query_embeds, request.prompt_ids, self.cache, start)
            self.stats.on_stage("prefill", time.perf_counter() - began)
            seq = _Sequence(request, rows=1, length=length, start=start, pending=np.zeros(0, np.int64),
                          next_cancel_check=time.monotonic() + self.cancel_poll_s)
            self.stats.on_prefill()
            self._set_active([*self._active, seq])
            self._advance(seq, logits)
        except BaseException as e:  # reported to this request only; the engine keeps serving
            self._fail(request, e)
            if seq is not None:
                seq.finished = True
        if seq is not None and seq.finished:
            self._set_active([s for s in self._active if s is not seq])

    def _drop_cancelled(self) -> None:
        """End the active sequences whose clients cancelled (each asks at most every cancel_poll_s)."""
        live = []
        now = time.monotonic()
        for seq in self._active:
            if now >= seq.next_cancel_check:
                seq.next_cancel_check = now + self.cancel_poll_s
                if seq.request.is_cancelled():
                    self._fail(seq.request, Cancelled("cancelled by the client"))
                    continue
            live.append(seq)
        if len(live) != len(self._active):
            self._set_active(live)

    def step(self) -> None:
        """One batched language-model call for every active sequence's rows."""
        if self.gate is not None:
            self.gate.wait(self._stop, self._drop_cancelled)
        self._drop_cancelled()
        live = self._active
        if not live:
            return
        try:
            began = time.perf_counter()
            logits = self._batched_call(live)
            self.stats.on_stage("decode_step", time.perf_counter() - began)
        except BaseException as e:
            log.exception("decoder step failed")
            for seq in live:
                self._fail(seq.request, e)
            self._set_active([])
            return
        self.stats.on_step(len(live))
        still = []
        for seq in live:
            seq.length += 1
            try:
                self._advance(seq, logits[seq.start : seq.start + seq.rows])
            except BaseException as e:
                self._fail(seq.request, e)
                continue
            if not seq.finished:
                still.append(seq)
        self._set_active(still)

    def _batched_call(self, live: list[_Sequence]) -> np.ndarray:
        """One language-model step over cache slots [0:rows): each row's pending token at its own position."""
        lengths = np.concatenate([np.full(s.rows, s.length, np.int64) for s in live])
        return self.language_model.step(np.concatenate([s.pending for s in live]), lengths, self.cache)

    def _advance(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Feed one step's logits to the request's search; reorder rows for beams; emit tokens."""
        request = seq.request
        result = request.search.step(logits)
        parents = np.asarray(result.parent_rows, dtype=np.int64)
        if not result.finished and (parents.shape[0] != seq.rows or np.any(parents != np.arange(seq.rows))):
            if parents.shape[0] != seq.rows and seq is not self._active[-1]:
                raise RuntimeError("only the newest sequence can change its number of rows")
            self.cache.reserve(seq.start + parents.shape[0], seq.length)
            self.cache.gather(seq.start, parents, seq.length)
            seq.rows = parents.shape[0]
        seq.pending = np.asarray(result.tokens, dtype=np.int64)
        seq.finished = bool(result.finished)
        seq.steps += 1
        self.stats.on_tokens(1)
        if seq.steps == 1:
            # Counted before the token's response goes out, so a client holding its answer finds
            # it counted; sending the first piece is left out.
            self.stats.on_first_token(time.perf_counter() - request.received)
        if seq.finished or request.stream:
            tokens = request.search.output_tokens()
            if seq.finished or len(tokens) > seq.emitted:
                if seq.finished:
                    self.stats.flush()
                request.on_tokens(list(tokens), len(tokens) - seq.emitted, seq.finished)
                seq.emitted = len(tokens)

    def _fail(self, request: Request, error: BaseException) -> None:
        self._take(request)
        self.stats.flush()
        try:
            request.on_error(error)
        except Exception:
            log.exception("could not report an error to a request")
