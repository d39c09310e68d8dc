"""Notices a dead model process and brings the model back, so that a crash costs seconds, not the service.

Triton 2.51 never notices on its own when a Python-backend model's process (its stub) dies, killed
by the OOM killer or a crash in a native library: /v2/health/ready keeps answering 200, and every
request to the model fails ("Stub process 'vision_encoder_0_0' is not healthy.") until someone
reloads it. The Supervisor, a thread of the process that owns the TritonServer, watches each
loaded model's stub and, when one is gone:

- a model that answers once per request (the stages: preprocess, vision_encoder, qformer) is
  unloaded (readiness drops at once, and requests that need it get UNAVAILABLE) and loaded again
  through Triton's model-control API (explicit mode). Its requests in flight had already failed:
  Triton answers them "not healthy"; the `blip2` model's own generations go on. The load does not
  wait for the unload to finish: a version that any request reached after its process died never
  finishes unloading (Triton 2.51's Python backend then returns without freeing that request's
  response factory, which holds the model), while a new version loads beside it at once.
- a decoupled model (`blip2`, which streams) makes tritonserver restart: Triton never answers the
  requests the dead process held (their streams stay open until the client's deadline, through an
  unload and a load), and closing every connection is the one way to end them, with UNAVAILABLE.
- tritonserver itself gone (exited, or its endpoints closed while the process lives on: its
  SIGSEGV handler shuts the server down, slowly or never) is restarted too. Triton 2.51 crashes
  so at times when a client cancels a gRPC stream as a response completes (the Python client
  never cancels: client/aio.py).

A dead process leaves its shared-memory region (/dev/shm/triton_python_backend_shm_region_*, named
on its command line) behind, as its instance is never destroyed; once the model is back, the
supervisor removes it (after a restart, the regions of every process of the old server).

Reloads and restarts are retried with a growing pause (RETRY_PAUSES); a reload that keeps failing
escalates to a restart, and a restart that keeps failing stops the server, so that its owner sees
it gone (`blip2-triton serve` then exits with the log) rather than a server that is up and cannot
serve. A stopped (SIGSTOP) or hung process is alive: it is left alone, and Triton itself answers
requests sent to it "not healthy" after a second.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

LOGGER = logging.getLogger(__name__)

POLL_SECONDS = 0.5
RETRY_PAUSES = (1.0, 2.0, 4.0)  # before the 2nd, 3rd and 4th attempt; then escalate
UNLOAD_TIMEOUT = 30.0
RELOAD, RESTART = "reload", "restart"
SERVER = "tritonserver"  # Recovery.models when tritonserver itself went away
SERVER_GONE_POLLS = 2  # polls in a row that must find tritonserver gone before it is restarted
SHM_DIR = Path("/dev/shm")
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"  # the Python backend's name for a stub's region


@dataclasses.dataclass
class Recovery:
    """One dead model process and what brought its model back."""

    models: tuple[str, ...]  # the models whose processes were found dead together
    action: str  # RELOAD (unload + load these models) or RESTART (tritonserver)
    detected: float  # time.monotonic() when the death was seen
    back: float | None = None  # time.monotonic() when the server was ready again; None: not (yet)
    attempts: int = 0

    @property
    def seconds(self) -> float | None:
        """From detection to ready again."""
        return None if self.back is None else self.back - self.detected


@dataclasses.dataclass(frozen=True)
class _Process:
    """One model's stub as last seen: pid, start time (None: there was none) and shared-memory region."""

    pid: int | None
    started: int | None
    region: str | None

    def alive(self) -> bool:
        return self.started is not None and process_start_time(self.pid) == self.started


def stub_region(pid: int | None) -> str | None:
    """The shared-memory region named on a Python-backend stub's command line, if any."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, TypeError):
        return None
    return next((w.decode() for w in words if w.startswith(SHM_REGION_PREFIX.encode())), None)


def process_start_time(pid: int | None) -> int | None:
    """A process's start time (clock ticks after boot), or None once it is gone or a zombie.
    With the pid, it names one process: a pid the kernel reuses has another start time."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # "pid (comm) state ...": comm may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])


class Supervisor:
    """Watches every loaded model's process of one TritonServer (started in explicit model-control
    mode) and brings a dead one's model back; see the module docstring.

    `server` is the TritonServer: model_pids(), repository_index(), model_config(), unload_model(),
    load_model(), restart() and stop_server_processes() are all it uses.
    """

    def __init__(self, server, poll_seconds: float = POLL_SECONDS):
        self.server = server
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._recoveries: list[Recovery] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._decoupled: dict[str, bool] = {}

    @property
    def recoveries(self) -> list[Recovery]:
        """Every recovery so far, oldest first (the last one may still be under way)."""
        with self._lock:
            return list(self._recoveries)

    def start(self) -> "Supervisor":
        # An ensemble has no process of its own: its steps' processes are watched.
        self._decoupled = {m: self._is_decoupled(m) for m in self._models()
                           if self.server.model_config(m).get("platform") != "ensemble"}
        self._thread = threading.Thread(target=self._run, name="tritonserver-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Stop watching; a recovery under way ends at its next step (the server is stopping)."""
        self._stop.set()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- watching -------------------------------------------------------------------------------
    def _models(self) -> list[str]:
        return sorted(m["name"] for m in self.server.repository_index() if m.get("state") == "READY")

    def _is_decoupled(self, model: str) -> bool:
        policy = self.server.model_config(model).get("model_transaction_policy", {})
        return bool(policy.get("decoupled", False))

    def _watch(self) -> dict[str, _Process]:
        """Model -> its stub as seen now (pid None for a model without one)."""
        pids = self.server.model_pids()
        return {m: _Process(pids.get(m), process_start_time(pids.get(m)), stub_region(pids.get(m)))
                for m in self._decoupled}

    def _run(self) -> None:
        watched = self._watch()
        gone = 0  # polls in a row that found tritonserver itself not serving
        while not self._stop.wait(self.poll_seconds):
            gone = 0 if self.server.is_serving() else gone + 1
            if gone >= SERVER_GONE_POLLS:
                dead = [SERVER]
            else:
                dead = sorted(m for m, process in watched.items() if not process.alive())
            if not dead:
                continue
            gone = 0
            try:
                action = self._recover(dead, {m: watched[m].pid if m in watched else self.server.pid for m in dead})
                for model, process in watched.items():
                    if process.region and (model in dead or action == RESTART):
                        (SHM_DIR / process.region).unlink(missing_ok=True)  # no process uses it now
            except _Stopping:
                return
            except Exception:  # a fault of this code must not end the watching
                LOGGER.exception("supervisor: recovering %s failed", ", ".join(dead))
            watched = self._watch()

    # ---- recovering -----------------------------------------------------------------------------
    def _recover(self, dead: list[str], pids: dict[str, int | None]) -> str:
        """Bring the models back (see the module docstring) -> the action that did (RELOAD, RESTART)."""
        action = RESTART if any(m == SERVER or self._decoupled[m] for m in dead) else RELOAD
        recovery = Recovery(tuple(dead), action, time.monotonic())
        with self._lock:
            self._recoveries.append(recovery)
        gone = ", ".join(f"{m!r} (pid {pids[m]})" if pids[m] else repr(m) for m in dead)
        if dead == [SERVER]:
            LOGGER.warning("tritonserver (pid %s) exited or stopped accepting connections; restarting it", pids[SERVER])
        else:
            LOGGER.warning("model process of %s died; %s", gone,
                           "restarting tritonserver" if action == RESTART else "reloading the model")
        if action == RELOAD and not self._retry(recovery, lambda: self._reload(dead)):
            LOGGER.error("could not reload %s; restarting tritonserver", ", ".join(dead))
            recovery.action = RESTART
        if recovery.action == RESTART and not self._retry(
                recovery, lambda: self.server.restart(
                    "it exited or closed its endpoints" if dead == [SERVER] else
                    f"the process of model(s) {', '.join(dead)} died")):
            LOGGER.error("tritonserver did not come back after %d attempts; stopping it", recovery.attempts)
            self.server.stop_server_processes()
            raise _Stopping()
        recovery.back = time.monotonic()
        LOGGER.warning("%s back after %.1f s (%s, %d attempt(s))", ", ".join(dead), recovery.seconds,
                       recovery.action, recovery.attempts)
        return recovery.action

    def _retry(self, recovery: Recovery, attempt) -> bool:
        for pause in (0.0, *RETRY_PAUSES):
            if self._stop.wait(pause):
                raise _Stopping()
            recovery.attempts += 1
            try:
                attempt()
                return True
            except Exception as e:
                if self._stop.is_set():
                    raise _Stopping() from e
                LOGGER.error("recovering %s: attempt %d failed: %s", ", ".join(recovery.models), recovery.attempts, e)
        return False

    def _reload(self, models: list[str]) -> None:
        for model in models:  # all unloaded first: the server is not ready from the first one on
            self.server.unload_model(model, wait=False, timeout=UNLOAD_TIMEOUT)
        for model in models:
            self.server.load_model(model)


class _Stopping(Exception):
    """The supervisor was stopped (the server is stopping) in the middle of a recovery."""
