"""A test hook: the engine's language-model calls, let through one by one from outside the server.

Tests that cancel a request mid-generation need the engine to stand still at a known point, on a
busy machine too. Slowing the server from outside (holding the compute lock, SIGSTOPping its
process) loses races: a helper thread that is descheduled lets the engine run on. The gate
cannot: the engine makes no language-model call (a prefill or a batched decode step) that the
test has not allowed.

Enabled only when STEP_GATE_ENV is "1" in the served models' environment (the tests' servers set
it); then the engine asks the gate before every call. The gate is a file in the server's runtime
directory: absent, every call passes (other tests on the same server run freely); present, it
holds how many calls may have been made in all. The engine writes how many it made, and whether
it is waiting, beside it. Files are replaced atomically (os.replace), so a reader sees the old or
the new number, never half of one.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

STEP_GATE_ENV = "BLIP2_TRITON_STEP_GATE"
POLL_S = 0.001


def gate_path(runtime_dir: str | Path) -> Path:
    return Path(runtime_dir) / "step-gate"


def _state_path(gate: Path) -> Path:
    return gate.with_name(gate.name + ".state")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


class StepGate:
    """The engine's side: `wait()` before each language-model call."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.taken = 0
        self._state(waiting=False)

    @classmethod
    def from_environment(cls) -> "StepGate | None":
        """The gate of this server's runtime directory when STEP_GATE_ENV asks for one, else None."""
        from .compute_lock import RUNTIME_DIR_ENV

        if os.environ.get(STEP_GATE_ENV) != "1":
            return None
        runtime_dir = os.environ.get(RUNTIME_DIR_ENV)
        if not runtime_dir:
            raise ValueError(f"{STEP_GATE_ENV}=1 needs {RUNTIME_DIR_ENV} (the launcher sets it)")
        return cls(gate_path(runtime_dir))

    def _state(self, waiting: bool) -> None:
        _write(_state_path(self.path), f"{self.taken} {int(waiting)}")

    def wait(self, stop: threading.Event, while_held: Callable[[], None] | None = None) -> None:
        """Return once the gate allows one more call (counting it), at once if it is open, or when
        `stop` is set (the engine is stopping). `while_held` is called between polls: the engine
        keeps dropping cancelled sequences while it is held, as it would between calls."""
        waiting = False
        while not stop.is_set():
            allowed = _read(self.path)
            if allowed is None or self.taken < int(allowed):
                break
            if not waiting:
                waiting = True
                self._state(waiting=True)
            if while_held is not None:
                while_held()
            stop.wait(POLL_S)
        self.taken += 1
        self._state(waiting=False)


class StepGateControl:
    """The test's side, for a server started with STEP_GATE_ENV=1.

    close() while the engine is idle; allow(n) lets n more calls through; open() lets all through.
    """

    def __init__(self, runtime_dir: str | Path):
        self.path = gate_path(runtime_dir)
        self.allowed = 0

    def state(self) -> tuple[int, bool]:
        """(calls the engine made so far, whether it is waiting at the gate now)."""
        text = _read(_state_path(self.path))
        if text is None:
            return 0, False
        taken, waiting = text.split()
        return int(taken), waiting == "1"

    @property
    def taken(self) -> int:
        return self.state()[0]

    def close(self) -> int:
        """No call passes from now on; returns the calls made so far."""
        self.allowed = self.taken
        _write(self.path, str(self.allowed))
        return self.allowed

    def allow(self, calls: int = 1) -> int:
        """Let `calls` more through; returns the total the engine may have made."""
        self.allowed += calls
        _write(self.path, str(self.allowed))
        return self.allowed

    def open(self) -> None:
        self.path.unlink(missing_ok=True)

    def wait_blocked(self, taken: int | None = None, blocked: bool = True, timeout: float = 60.0) -> int:
        """Wait until the engine made every allowed call (or `taken` calls) and, with `blocked`,
        waits at the gate for the next; returns the calls made."""
        taken = self.allowed if taken is None else taken
        deadline = time.monotonic() + timeout
        while True:
            made, waiting = self.state()
            if made >= taken and (waiting or not blocked):
                return made
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine made {made} of {taken} calls and is "
                                   f"{'' if waiting else 'not '}waiting at the gate after {timeout:g} s")
            time.sleep(POLL_S * 5)

    def release_until(self, done, interval: float = 0.25, max_calls: int = 100) -> int:
        """Let calls through one at a time, `interval` s apart, until `done()` is true; returns
        the calls let through (AssertionError after `max_calls`)."""
        for calls in range(max_calls + 1):
            if done():
                return calls
            self.allow(1)
            time.sleep(interval)
        raise AssertionError(f"still not done after {max_calls} calls let through one at a time")

    def __enter__(self) -> "StepGateControl":
        self.close()
        return self

    def __exit__(self, *exc) -> None:
        self.open()
