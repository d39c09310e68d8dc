"""A model process that dies (the OOM killer, a crash in a native library): the server notices within
seconds, stops saying it is ready, answers UNAVAILABLE, and serves again within 30 s by itself.

The Supervisor's decisions run against stand-in processes; the fault test kills the real stubs of a
real tritonserver under streaming load, one model after another, `blip2`'s included.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from blip2_triton import api
from blip2_triton.client import Blip2Client, UnavailableError
from blip2_triton.client.aio import AsyncBlip2Client
from blip2_triton.client.errors import Blip2Error, from_status
from blip2_triton.server import supervisor
from blip2_triton.server.supervisor import RELOAD, RESTART, SERVER, SHM_DIR, Supervisor, stub_region

from .conftest import BackgroundLoad, metric, random_image, wait_for_active


# ---- the client's side of it ------------------------------------------------------------------------
@pytest.mark.parametrize("status,message", [
    (None, api.unavailable_message("model 'qformer': Stub process 'qformer_0_0' is not healthy.")),  # streamed
    ("UNAVAILABLE", api.unavailable_message("model 'vision_encoder': Model 'vision_encoder' is not ready.")),
    (None, "Stub process 'blip2_0_0' is not healthy."),  # blip2's own process, streamed: Triton's words
    ("INTERNAL", "Stub process 'blip2_0_0' is not healthy."),  # the same, unary
    (None, "Failed to obtain the health mutex."),  # it died holding that lock
    ("UNAVAILABLE", "Stream removed (Socket closed)"),  # the server restarting under a stream
    # a request that reaches a tritonserver being stopped (the supervisor restarting it)
    (None, "[request id: 559c0b25] Server is stopping, scheduler for model has stopped accepting new inference "
           "requests"),
    # what a server before this change sent for a dead stage
    (None, "internal error: RuntimeError: model 'qformer': Stub process 'qformer_0_0' is not healthy."),
])
def test_a_dead_or_returning_model_is_unavailable_at_the_client(status, message):
    error = from_status(status, message)
    assert type(error) is UnavailableError and error.status in ("UNAVAILABLE", "INTERNAL")


def test_other_internal_errors_stay_server_errors():
    assert type(from_status(None, "internal error: RuntimeError: boom")).__name__ == "ServerError"
    assert type(from_status("INTERNAL", "stub process crashed")).__name__ == "ServerError"


# ---- the Supervisor's decisions, over stand-in processes ------------------------------------------------
class _StandIn:
    """What the Supervisor uses of a TritonServer, with `sleep` processes standing in for the models'
    stubs. `failing[action]` makes that many next loads or restarts fail."""

    def __init__(self, decoupled: dict[str, bool]):
        self.decoupled = decoupled
        self.procs = {m: self._process() for m in decoupled}
        self.calls: list[tuple[str, ...]] = []
        self.failing: collections.Counter = collections.Counter()
        self.stopped = threading.Event()

    @staticmethod
    def _process() -> subprocess.Popen:
        return subprocess.Popen(["sleep", "600"])

    serving = True  # tritonserver itself (is_serving)
    pid = 4242

    def is_serving(self) -> bool:
        return self.serving

    def kill(self, model: str) -> None:
        self.procs[model].kill()
        self.procs[model].wait()

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()

    def _attempt(self, *call) -> None:
        self.calls.append(call)
        if self.failing[call[0]]:
            self.failing[call[0]] -= 1
            raise RuntimeError(f"{call[0]} failed (as told)")

    def repository_index(self):
        return [{"name": m, "state": "READY"} for m in self.procs]

    def model_config(self, model):
        return {"model_transaction_policy": {"decoupled": self.decoupled[model]}}

    def model_pids(self):
        return {m: p.pid for m, p in self.procs.items() if p.poll() is None}

    def unload_model(self, model, wait=True, timeout=30.0):
        self.calls.append(("unload", model))

    def load_model(self, model):
        self._attempt("load", model)
        self.procs[model] = self._process()

    def restart(self, reason):
        self._attempt("restart")
        self.close()
        self.procs = {m: self._process() for m in self.decoupled}
        self.serving = True

    def stop_server_processes(self):
        self.calls.append(("stop",))
        self.stopped.set()


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(supervisor, "RETRY_PAUSES", (0.01, 0.01, 0.01))
    server = _StandIn({"blip2": True, "qformer": False, "vision_encoder": False})
    watcher = Supervisor(server, poll_seconds=0.02).start()
    yield server, watcher
    watcher.stop()
    server.close()


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.01)


def _recovered(watcher, count: int) -> bool:
    recoveries = watcher.recoveries
    return len(recoveries) >= count and recoveries[count - 1].back is not None


def test_a_dead_stage_is_unloaded_and_loaded_again(stand_in):
    server, watcher = stand_in
    server.kill("qformer")
    _wait_for(lambda: _recovered(watcher, 1), "recovery")
    assert server.calls == [("unload", "qformer"), ("load", "qformer")]
    (recovery,) = watcher.recoveries
    assert (recovery.models, recovery.action, recovery.attempts) == (("qformer",), RELOAD, 1)
    server.kill("vision_encoder")  # the supervisor watches the new processes too
    _wait_for(lambda: _recovered(watcher, 2), "second recovery")
    assert watcher.recoveries[1].models == ("vision_encoder",)


def test_a_dead_decoupled_model_restarts_the_server(stand_in):
    server, watcher = stand_in
    server.kill("blip2")
    _wait_for(lambda: _recovered(watcher, 1), "recovery")
    assert server.calls == [("restart",)] and watcher.recoveries[0].action == RESTART
    server.kill("qformer")  # every process is new after the restart, and watched
    _wait_for(lambda: _recovered(watcher, 2), "second recovery")
    assert server.calls[-1] == ("load", "qformer")


def test_a_server_gone_while_its_model_processes_live_on_is_restarted(stand_in):
    """tritonserver's SIGSEGV handler closes the endpoints and may then hang: no stub dies."""
    server, watcher = stand_in
    server.serving = False
    _wait_for(lambda: _recovered(watcher, 1), "recovery")
    assert server.calls == [("restart",)]
    assert (watcher.recoveries[0].models, watcher.recoveries[0].action) == ((SERVER,), RESTART)
    server.kill("qformer")  # watched again after the restart
    _wait_for(lambda: _recovered(watcher, 2), "second recovery")
    assert server.calls[-1] == ("load", "qformer")


def test_failed_loads_are_retried_then_escalate_to_a_restart(stand_in):
    server, watcher = stand_in
    server.failing["load"] = 2
    server.kill("qformer")
    _wait_for(lambda: _recovered(watcher, 1), "recovery")
    assert watcher.recoveries[0].attempts == 3 and watcher.recoveries[0].action == RELOAD

    server.failing["load"] = 1 + len(supervisor.RETRY_PAUSES)
    server.kill("qformer")
    _wait_for(lambda: _recovered(watcher, 2), "second recovery")
    recovery = watcher.recoveries[1]
    assert recovery.action == RESTART and server.calls[-1] == ("restart",)
    assert recovery.attempts == 1 + len(supervisor.RETRY_PAUSES) + 1


def test_a_server_that_does_not_come_back_is_stopped(stand_in):
    server, watcher = stand_in
    server.failing["restart"] = 100
    server.kill("blip2")
    assert server.stopped.wait(30), "the supervisor never gave up"
    assert [c for c in server.calls if c != ("stop",)] == [("restart",)] * (1 + len(supervisor.RETRY_PAUSES))
    assert watcher.recoveries[0].back is None


# ---- the real server under load ------------------------------------------------------------------------
BACK_WITHIN = 30.0  # seconds from a kill to a served request, as the issue asks
REQUEST_TIMEOUT = 60.0  # every load request's deadline: one that hangs ends as DeadlineExceededError
DETECT_WITHIN = 10.0  # seconds from a kill to readiness false
LOAD_CLIENTS = 3
NEW_TOKENS = 100  # long enough that `blip2` holds sequences most of the time (the tiny model has 128 positions)


@dataclasses.dataclass
class _Call:
    began: float
    ended: float | None = None
    error: Blip2Error | None = None


class _Load(BackgroundLoad):
    """LOAD_CLIENTS asyncio clients streaming captions back to back, on a thread of their own; every
    call is recorded. A client whose call failed pauses a little, as one that retries would."""

    def __init__(self, url: str):
        super().__init__(LOAD_CLIENTS, REQUEST_TIMEOUT + 30)
        self.url = url
        self.calls: list[_Call] = []

    async def _client(self, index: int) -> None:
        async with AsyncBlip2Client(self.url, timeout=REQUEST_TIMEOUT) as client:
            while not self._stop.is_set():
                call = _Call(time.monotonic())
                self.calls.append(call)
                try:
                    # A new picture each time: a cached one would skip the stages whose deaths this test is about.
                    async for _ in client.stream(_new_image(), max_new_tokens=NEW_TOKENS,
                                                 min_new_tokens=NEW_TOKENS):
                        pass
                except Blip2Error as e:
                    call.error = e
                call.ended = time.monotonic()
                if call.error is not None:
                    await asyncio.sleep(0.2)

    def served_since(self, moment: float) -> bool:
        return any(c.began >= moment and c.ended is not None and c.error is None for c in list(self.calls))


class _Readiness:
    """/v2/health/ready polled every 50 ms on a thread; `not_ready_between(a, b)` -> the first time
    it read false in [a, b], or None."""

    def __init__(self, server):
        self.server = server
        self.readings: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            ready = self.server.is_ready()
            self.readings.append((time.monotonic(), ready))

    def __enter__(self) -> "_Readiness":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def first_not_ready(self, start: float, end: float) -> float | None:
        return next((t for t, ready in list(self.readings) if start <= t <= end and not ready), None)


def _kill(server, model: str) -> tuple[float, float]:
    """SIGKILL `model`'s process -> (when, blip2's active sequences then). `blip2` is killed while it
    generates: frozen (SIGSTOP) for the few milliseconds of reading the gauge, which it cannot change
    meanwhile, and let go again until the gauge reads sequences."""
    pid = server.model_pids()[model]
    deadline = time.monotonic() + 60
    while True:
        os.kill(pid, signal.SIGSTOP)
        active = metric(server, "blip2_active_sequences")
        if model != api.PIPELINE or active >= 1:
            os.kill(pid, signal.SIGKILL)
            return time.monotonic(), active
        os.kill(pid, signal.SIGCONT)
        assert time.monotonic() < deadline, "the load never had a sequence active"
        time.sleep(0.02)


_IMAGES = itertools.count(100_000)


def _new_image() -> bytes:
    """A picture no request sent before, so blip2's image cache never answers for the stages."""
    return random_image(next(_IMAGES))


def _caption(server) -> Blip2Error | None:
    with Blip2Client(server.grpc_url, timeout=REQUEST_TIMEOUT) as client:
        try:
            client.caption(_new_image(), max_new_tokens=3)
        except Blip2Error as e:
            return e
    return None


def _seconds_until_served(server, since: float) -> float:
    """Captions until one is served; -> seconds from `since`. Only UnavailableError is expected."""
    while True:
        error = _caption(server)
        if error is None:
            return time.monotonic() - since
        assert isinstance(error, UnavailableError), f"{type(error).__name__}: {error}"
        assert time.monotonic() - since < BACK_WITHIN, (
            f"not served {BACK_WITHIN:.0f} s after the kill; last error: {error}; recoveries: {server.recoveries}\n"
            f"{server.log_tail(30)}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def supervised(exported, tmp_path_factory):
    from blip2_triton.server import TritonServer

    _, repo, _ = exported("tiny-opt")
    log = tmp_path_factory.mktemp("logs") / "faults.log"
    with TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None, log_file=log, supervise=True) as server:
        yield server


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_each_dead_model_process_is_noticed_answered_and_brought_back(supervised):
    """Under streaming load, each model's process in turn is SIGKILLed (a stage after the restart too,
    so the supervisor is seen to follow the new process group). Each time: readiness drops, the
    requests in flight end (served, or UnavailableError), a caption sent right after the kill gets
    UnavailableError (or is served by the model already back), and captions are served again within
    BACK_WITHIN s. No request hangs; the engine ends with no active sequence."""
    server = supervised
    order = [api.PREPROCESS, "vision_encoder", api.PIPELINE, "qformer"]
    measured = {}
    with _Load(server.grpc_url) as load, _Readiness(server) as readiness:
        since = time.monotonic()
        for model in order:
            _wait_for(lambda: load.served_since(since), "load served before the kill", BACK_WITHIN)
            recoveries = len(server.recoveries)
            regions = {m: stub_region(pid) for m, pid in server.model_pids().items()}
            killed, active = _kill(server, model)
            probe_sent, probe_error = time.monotonic(), _caption(server)
            back = _seconds_until_served(server, killed)
            _wait_for(lambda: _recovered(server, recoveries + 1), f"{model}: recovery recorded", BACK_WITHIN)
            recovery = server.recoveries[recoveries]
            assert recovery.models == (model,)
            assert recovery.action == (RESTART if model == api.PIPELINE else RELOAD)

            dropped = readiness.first_not_ready(killed, recovery.back)
            assert dropped is not None, f"{model}: /v2/health/ready never read false before it was back"
            assert dropped - killed < DETECT_WITHIN
            assert isinstance(probe_error, UnavailableError) or (probe_error is None and recovery.back <= probe_sent), (
                f"{model}: a caption right after the kill: {probe_error!r}")
            # The dead process's shared memory is removed; after a restart, every old process's.
            left = [r for m, r in regions.items() if m == model or recovery.action == RESTART]
            assert left and all(left)
            _wait_for(lambda: not any((SHM_DIR / r).exists() for r in left), f"{model}: shared memory removed")
            if model == api.PIPELINE:  # the sequences it held got UNAVAILABLE, and did not hang
                held = [c for c in load.calls if c.began < killed and (c.ended is None or c.ended > killed)]
                assert any(isinstance(c.error, UnavailableError) for c in held), held
            measured[model] = {"action": recovery.action, "active_at_kill": active,
                               "not_ready_after_s": round(dropped - killed, 2),
                               "detected_after_s": round(recovery.detected - killed, 2),
                               "recovery_s": round(recovery.seconds, 2), "served_after_s": round(back, 2)}
            since = time.monotonic()
        _wait_for(lambda: load.served_since(since), "load served after the last recovery", BACK_WITHIN)

    errors = collections.Counter(type(c.error).__name__ for c in load.calls if c.error is not None)
    assert set(errors) <= {"UnavailableError"}, errors
    assert all(c.error.status == "UNAVAILABLE" for c in load.calls if c.error is not None)
    assert all(c.ended - c.began < REQUEST_TIMEOUT for c in load.calls)
    wait_for_active(server, 0, timeout=30)
    served = sum(c.error is None for c in load.calls)
    print(json.dumps({"measured": measured, "calls": len(load.calls), "served": served, "errors": dict(errors)},
                     indent=1))


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_crashed_tritonserver_is_restarted(supervised):
    """tritonserver 2.51 itself crashes at times: a SIGSEGV in its gRPC front end when a client
    cancels a stream as a response completes. Its signal handler closes the endpoints and shuts
    down, slowly or never, while the model processes live on. Under streaming load, SIGSEGV to
    tritonserver: readiness drops, the calls in flight end (served, or UnavailableError), the
    supervisor restarts it, captions are served again within BACK_WITHIN s, and no request hangs."""
    server = supervised
    with _Load(server.grpc_url) as load, _Readiness(server) as readiness:
        since = time.monotonic()
        _wait_for(lambda: load.served_since(since), "load served before the crash", BACK_WITHIN)
        recoveries = len(server.recoveries)
        crashed = time.monotonic()
        os.kill(server.pid, signal.SIGSEGV)
        back = _seconds_until_served(server, crashed)
        _wait_for(lambda: _recovered(server, recoveries + 1), "recovery recorded", BACK_WITHIN)
        recovery = server.recoveries[recoveries]
        # tritonserver seen gone, or, when its process exits at once, its model processes seen dead
        assert recovery.action == RESTART, recovery
        dropped = readiness.first_not_ready(crashed, recovery.back)
        assert dropped is not None and dropped - crashed < DETECT_WITHIN, dropped
        since = time.monotonic()
        _wait_for(lambda: load.served_since(since), "load served after the restart", BACK_WITHIN)

    errors = collections.Counter(type(c.error).__name__ for c in load.calls if c.error is not None)
    assert set(errors) <= {"UnavailableError"}, errors
    assert all(c.ended - c.began < REQUEST_TIMEOUT for c in load.calls)
    wait_for_active(server, 0, timeout=30)
    print(json.dumps({"recovered_by": recovery.models, "not_ready_after_s": round(dropped - crashed, 2),
                      "recovery_s": round(recovery.seconds, 2), "served_after_s": round(back, 2),
                      "calls": len(load.calls), "errors": dict(errors)}))
