"""Start, watch and stop one real `tritonserver` process (from the nvidia-pytriton wheel).

    with TritonServer("model_repository", grpc_port=None, http_port=None, metrics_port=None) as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
        ...

`start()` returns once the server is live and every model of the repository is READY; it raises
TritonStartupError (with the tail of the server log) if the process exits early or the time-out
passes. `stop()` sends SIGTERM to tritonserver so that it unloads its models (the Python-backend
stubs run `finalize` and exit), then SIGKILLs whatever is left of the process group.

tritonserver runs in explicit model-control mode with every model loaded, so that a model can be
unloaded and loaded again (`unload_model`, `load_model`). With `supervise=True` a Supervisor
(server/supervisor.py) brings back a model whose process died, by reloading it or by `restart()`.

Nothing outlives its owner: each server keeps its runtime files (backend directory, default log,
the compute lock) in one runtime directory, and a watchdog process (server/watchdog.py) stops the
server and removes that directory as soon as the owner goes, even when it is SIGKILLed.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Sequence

from blip2_triton.server.discovery import (
    TritonInstallation,
    find_installation,
    prepare_backend_directory,
    server_environment,
)
from blip2_triton.server.supervisor import Recovery, Supervisor
from blip2_triton.serving.compute_lock import RUNTIME_DIR_ENV

LOGGER = logging.getLogger(__name__)

LOG_TAIL_LINES = 60
_POLL_SECONDS = 0.1


class TritonStartupError(RuntimeError):
    """tritonserver did not become ready; the message carries the reason and the log tail."""


def free_ports(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that were free on `host` a moment ago (all bound at once)."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port that was free on `host` a moment ago."""
    return free_ports(1, host)[0]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True if something listens on (host, port); a port in TIME_WAIT counts as free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is `pgid` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def model_stub_pids(pgid: int) -> dict[str, int]:
    """Served model name -> pid of its Python-backend stub, among the members of process group
    `pgid` (a stub's command line names its `<model>/<version>/model.py`)."""
    pids = {}
    for pid in process_group_members(pgid):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        model = next((Path(w.decode()).parent.parent.name for w in words if w.endswith(b"/model.py")), None)
        if model:
            pids[model] = pid
    return pids


# Error-level lines tritonserver always prints on a CPU-only host; they mean nothing here.
HARMLESS_LOG_PATTERNS = (
    "CudaDriverHelper has not been initialized",
    "Failed to initialize NVML",
    "DCGM unable to start",
    "Unable to allocate pinned system memory",
)
_ERROR_LINE = re.compile(r"^(E\d{4} |error: )")


def log_errors(path: Path | None, limit: int = 20) -> list[str]:
    """Error lines of a tritonserver log (glog `E....` lines and the final `error: ...`),
    without the harmless CPU-host ones, at most `limit` (the last ones)."""
    if path is None or not path.exists():
        return []
    with path.open("r", errors="replace") as f:
        found = [
            line.rstrip() for line in f
            if _ERROR_LINE.match(line) and not any(p in line for p in HARMLESS_LOG_PATTERNS)
        ]
    return found[-limit:]


def _tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not path.exists():
        return "(no server log)"
    with path.open("r", errors="replace") as f:
        return "".join(collections.deque(f, maxlen=lines)).rstrip() or "(server log is empty)"


class TritonServer:
    """One tritonserver process serving `model_repository` over gRPC, HTTP and metrics.

    Ports: an int, or None to pick a free port on 127.0.0.1 at start(). `host` is the address
    every endpoint binds to (tritonserver's --grpc-address/--http-address/--metrics-address);
    the urls always name 127.0.0.1 when it is a wildcard. The server log (tritonserver and the
    stubs' stdout/stderr) goes to `log_file`, by default a file in a private work directory that
    stop() removes; `echo_log=True` also copies it line by line to stdout.

    `supervise=True` starts a Supervisor once the server is ready: a model whose process dies is
    reloaded, or tritonserver restarted on the same ports (see server/supervisor.py); `recoveries`
    lists what it did. `restart_grace` bounds how long a restart lets tritonserver unload its
    models before its process group is killed.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        *,
        grpc_port: int | None = 8001,
        http_port: int | None = 8000,
        metrics_port: int | None = 8002,
        host: str = "127.0.0.1",
        log_file: str | os.PathLike | None = None,
        log_verbose: int = 0,
        echo_log: bool = False,
        startup_timeout: float = 120.0,
        exit_timeout: int = 10,
        extra_args: Sequence[str] = (),
        installation: TritonInstallation | None = None,
        env: dict[str, str] | None = None,
        supervise: bool = False,
        restart_grace: float = 10.0,
    ):
        self.model_repository = Path(model_repository).resolve()
        self._requested_ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.ports: dict[str, int] = {}
        self.host = host
        self._log_file = Path(log_file).resolve() if log_file is not None else None
        self.log_path: Path | None = None
        self.log_verbose = log_verbose
        self.echo_log = echo_log
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout
        self.extra_args = list(extra_args)
        self._installation = installation
        self._env = dict(env or {})  # added to the server's environment (its model stubs inherit it)
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._watchdog: subprocess.Popen | None = None
        self._owner_pipe: int | None = None  # write end of the watchdog's stdin: closed = owner gone
        self._log_handle: IO[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._cmd: list[str] = []
        self._server_env: dict[str, str] = {}
        self.startup_seconds: float | None = None
        self.supervise = supervise
        self.restart_grace = restart_grace
        self._supervisor: Supervisor | None = None
        self._lifecycle = threading.RLock()  # restart() and stop() replace or end the process
        self._restarting = False
        self._closing = threading.Event()  # stop() was called: a restart under way gives up

    # ---- addresses -------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    def _port(self, kind: str) -> int:
        if kind not in self.ports:
            raise RuntimeError("the server has no ports before start()")
        return self.ports[kind]

    @property
    def grpc_url(self) -> str:
        """"127.0.0.1:PORT", as tritonclient.grpc.InferenceServerClient(url=...) takes it."""
        return f"{self._client_host}:{self._port('grpc')}"

    @property
    def http_url(self) -> str:
        """"127.0.0.1:PORT", as tritonclient.http.InferenceServerClient(url=...) takes it."""
        return f"{self._client_host}:{self._port('http')}"

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus endpoint, "http://127.0.0.1:PORT/metrics"."""
        return f"http://{self._client_host}:{self._port('metrics')}/metrics"

    # ---- process state ---------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def pgid(self) -> int | None:
        """Process group of tritonserver and its stubs (tritonserver leads its own session)."""
        return self._process.pid if self._process else None

    def poll(self) -> int | None:
        """Exit code of tritonserver, or None while it runs, while restart() replaces it, or before start."""
        if self._restarting:
            return None
        return self._process.poll() if self._process else None

    def is_running(self) -> bool:
        return self._restarting or (self._process is not None and self._process.poll() is None)

    def is_serving(self) -> bool:
        """False once tritonserver has exited, or has closed its endpoints while its process lives
        on (its SIGSEGV handler shuts the server down, which can take long or hang); True while
        restart() replaces it. A busy server that is slow to accept still counts as serving."""
        if self._restarting or self._process is None:
            return True
        if self._process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host,
                                           self.ports["http"]), timeout=5.0):
                return True
        except ConnectionRefusedError:
            return self._restarting  # refused during a restart that began meanwhile: not a crash
        except OSError:
            return True

    def model_pids(self) -> dict[str, int]:
        """Loaded model name -> pid of its Python-backend stub (a model without one is absent)."""
        return model_stub_pids(self.pgid) if self.pgid else {}

    @property
    def recoveries(self) -> list[Recovery]:
        """What the supervisor did so far, oldest first (empty without `supervise`)."""
        return self._supervisor.recoveries if self._supervisor else []

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def _command(self, inst: TritonInstallation, backend_directory: Path) -> list[str]:
        return [
            str(inst.server_binary),
            "--model-repository", str(self.model_repository),
            "--backend-directory", str(backend_directory),
            "--grpc-address", self.host, "--grpc-port", str(self.ports["grpc"]),
            "--http-address", self.host, "--http-port", str(self.ports["http"]),
            "--metrics-address", self.host, "--metrics-port", str(self.ports["metrics"]),
            "--log-verbose", str(self.log_verbose),
            "--exit-timeout-secs", str(self.exit_timeout),
            "--model-control-mode", "explicit", "--load-model", "*",
            *self.extra_args,
        ]

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "TritonServer":
        """Launch tritonserver and block until it and all repository models are ready."""
        if self._process is not None:
            raise RuntimeError("this TritonServer was already started")
        if not self.model_repository.is_dir():
            raise TritonStartupError(f"model repository {self.model_repository} is not a directory")
        self._installation = self._installation or find_installation()
        missing = [k for k, v in self._requested_ports.items() if v is None]
        picked = iter(free_ports(len(missing), self._client_host)) if missing else iter(())
        self.ports = {k: (v if v is not None else next(picked)) for k, v in self._requested_ports.items()}
        # Checked up front: another server already on the HTTP port would answer our readiness
        # probe while this one is still loading models.
        busy = [f"{k} port {p}" for k, p in self.ports.items() if port_in_use(p, self.host)]
        if busy:
            raise TritonStartupError(f"cannot start tritonserver: {', '.join(busy)} already in use on {self.host}")

        self._workdir = Path(tempfile.mkdtemp(prefix="blip2-triton-server-"))
        self._server_env = server_environment(self._installation) | self._env | {RUNTIME_DIR_ENV: str(self._workdir)}
        try:
            backends = prepare_backend_directory(self._installation, self._workdir / "backends")
            self.log_path = self._log_file or self._workdir / "tritonserver.log"
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = self.log_path.open("wb")
            self._cmd = self._command(self._installation, backends)
            LOGGER.info("starting %s", " ".join(self._cmd))
            started = time.monotonic()
            self._launch()
        except BaseException:
            if self._log_handle is not None:
                self._log_handle.close()
                self._log_handle = None
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            raise
        self._start_watchdog()
        atexit.register(self.stop)
        try:
            self._wait_ready(started)
            if self.supervise:
                self._supervisor = Supervisor(self).start()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        LOGGER.info(
            "tritonserver ready in %.1fs: grpc %s, http %s, metrics %s",
            self.startup_seconds, self.grpc_url, self.http_url, self.metrics_url,
        )
        return self

    def _launch(self) -> None:
        """Start the tritonserver process (start() and restart() have prepared everything else)."""
        self._process = subprocess.Popen(
            self._cmd,
            env=self._server_env,
            # A private cwd: the stubs put '' (the cwd) first on sys.path, so the caller's
            # cwd could shadow packages imported by model.py files.
            cwd=self._workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.echo_log else self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() can reach every stub
        )
        if self.echo_log:
            self._pump = threading.Thread(target=self._copy_output, args=(self._process,), name="tritonserver-log",
                                          daemon=True)
            self._pump.start()

    def restart(self, reason: str) -> float:
        """Stop tritonserver and every process of its group, and start it again on the same ports,
        with the same runtime directory and log; returns the seconds until it was ready again.

        For a fault that a model reload cannot mend: every connection drops, so each request in
        flight ends with UNAVAILABLE at the client. tritonserver gets SIGTERM and `restart_grace`
        seconds to unload its models (it would wait for requests that a dead model process never
        answers), then its group gets SIGKILL. Raises TritonStartupError as start() does.
        """
        with self._lifecycle:
            if self._process is None or self._closing.is_set():
                raise TritonStartupError("the server is not running (stopped, or never started)")
            LOGGER.warning("restarting tritonserver: %s", reason)
            began = time.monotonic()
            self._restarting = True
            try:
                self._end_process(self.restart_grace, until_models_unloaded=True)
                self._log_handle.write(f"--- blip2-triton: restarting tritonserver: {reason} ---\n".encode())
                self._log_handle.flush()
                self._launch()
                if self._owner_pipe is not None:  # the watchdog now guards the new process group
                    os.write(self._owner_pipe, f"{self._process.pid}\n".encode())
                self._wait_ready(began)
            finally:
                self._restarting = False
            return time.monotonic() - began

    def stop_server_processes(self) -> int | None:
        """End tritonserver and its process group as restart() does (SIGTERM, then SIGKILL once no
        model process is left or after `restart_grace`), keeping the runtime directory and the log
        for stop(): what the supervisor does when restarts keep failing, so that the owner sees
        the server gone. Returns its exit code."""
        with self._lifecycle:
            if self._process is None:
                return None
            self._end_process(self.restart_grace, until_models_unloaded=True)
            return self._process.returncode

    @property
    def runtime_dir(self) -> Path | None:
        """The server's runtime files (backend directory, default log, compute lock), removed on stop."""
        return self._workdir

    def _start_watchdog(self) -> None:
        read, self._owner_pipe = os.pipe()  # both ends non-inheritable: no other child holds the write end
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "blip2_triton.server.watchdog", str(self._process.pid), str(self._workdir)],
                # stdin: the owner's pipe (EOF: the owner is gone; a line: the pgid after a restart)
                stdin=read, stdout=subprocess.DEVNULL, start_new_session=True,  # a Ctrl-C for the owner skips it
            )
        finally:
            os.close(read)

    def _stop_watchdog(self) -> None:
        """Closing the pipe tells the watchdog the owner is done; it finds nothing left, and exits."""
        if self._owner_pipe is not None:
            os.close(self._owner_pipe)
            self._owner_pipe = None
        if self._watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(10)
            self._watchdog = None

    def _copy_output(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        try:
            for line in iter(process.stdout.readline, b""):
                self._log_handle.write(line)
                self._log_handle.flush()
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()
        except (ValueError, AttributeError):  # stop() closed the log under a straggling writer
            pass

    def _http(self, method: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.http_url}{path}", method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def repository_index(self) -> list[dict]:
        """Models the server knows: [{"name", "version", "state", "reason"?}, ...]."""
        status, body = self._http("POST", "/v2/repository/index")
        if status != 200:
            raise RuntimeError(f"repository index: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def model_config(self, model: str) -> dict:
        """A loaded model's configuration as Triton holds it (JSON form of config.pbtxt)."""
        status, body = self._http("GET", f"/v2/models/{model}/config")
        if status != 200:
            raise RuntimeError(f"config of model {model!r}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def is_ready(self) -> bool:
        """/v2/health/ready: the server is up and every model it knows is READY."""
        try:
            return self._http("GET", "/v2/health/ready", timeout=5.0)[0] == 200
        except OSError:
            return False

    def unload_model(self, model: str, wait: bool = True, timeout: float = 30.0) -> None:
        """Unload `model`: the server stops being ready at once. With `wait`, return once it is
        gone (Triton lets its requests in flight finish first; RuntimeError after `timeout`),
        else once it is no longer READY."""
        status, body = self._http("POST", f"/v2/repository/models/{model}/unload", timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            state = {m["name"]: m.get("state") for m in self.repository_index()}.get(model)
            if state not in ("READY", "UNLOADING") or (state == "UNLOADING" and not wait):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"model {model!r} still {state} {timeout:.0f} s after unload "
                                   f"(HTTP {status}: {body[:200]!r})")
            time.sleep(_POLL_SECONDS)

    def load_model(self, model: str) -> None:
        """Load `model` from the repository; returns once it is READY (RuntimeError if it fails)."""
        status, body = self._http("POST", f"/v2/repository/models/{model}/load", timeout=self.startup_timeout)
        if status != 200:
            raise RuntimeError(f"loading model {model!r}: HTTP {status}: {body[:300]!r}")

    def _fail(self, reason: str) -> TritonStartupError:
        errors = log_errors(self.log_path)
        summary = "\n--- errors in the server log ---\n" + "\n".join(errors) if errors else ""
        return TritonStartupError(
            f"{reason}{summary}\n--- last {LOG_TAIL_LINES} lines of the server log ({self.log_path}) ---\n"
            f"{self.log_tail()}"
        )

    def _wait_ready(self, started: float) -> None:
        # With --strict-readiness (the default) /v2/health/ready answers 200 only once every
        # model is loaded; with the default --exit-on-error a model that fails to load makes
        # the server exit, which the poll() check reports with the log.
        deadline = started + self.startup_timeout
        while True:
            if self._closing.is_set():
                raise TritonStartupError("the server is being stopped")
            code = self._process.poll()
            if code is not None:
                self._join_pump()
                raise self._fail(f"tritonserver exited with code {code} during startup")
            try:
                status, _ = self._http("GET", "/v2/health/ready", timeout=1.0)
            except OSError:
                status = None  # not listening yet
            if status == 200 and self._process.poll() is None:
                break
            if time.monotonic() > deadline:
                raise self._fail(
                    f"tritonserver was not ready after {self.startup_timeout:.0f}s "
                    f"(last /v2/health/ready status: {status})"
                )
            time.sleep(_POLL_SECONDS)
        expected = sorted(p.name for p in self.model_repository.iterdir() if (p / "config.pbtxt").is_file())
        index = self.repository_index()
        not_ready = [m for m in index if m.get("state") != "READY"]
        absent = sorted(set(expected) - {m["name"] for m in index})
        if not_ready or absent:
            details = [f"{m['name']}: {m.get('state')} {m.get('reason', '')}".rstrip() for m in not_ready]
            details += [f"{name}: not loaded" for name in absent]
            raise self._fail("tritonserver is up but not all models are ready: " + "; ".join(details))

    def _join_pump(self, timeout: float = 5.0) -> None:
        if self._pump is not None:
            self._pump.join(timeout)

    def stop(self, grace: float | None = None) -> int | None:
        """Stop tritonserver and every process of its group; returns its exit code.

        SIGTERM goes to tritonserver only, so that it unloads the models and lets their stubs
        finalize; after `grace` seconds (default: exit_timeout + 15) the whole group gets
        SIGKILL. Stubs left behind by a crash are killed the same way. Idempotent.
        """
        if self._process is None:
            return None
        self._closing.set()  # a restart under way gives up, and the supervisor starts no other
        if self._supervisor is not None:
            self._supervisor.stop(wait=False)
        with self._lifecycle:
            atexit.unregister(self.stop)
            self._end_process(self.exit_timeout + 15.0 if grace is None else grace)
            if self._supervisor is not None:
                self._supervisor.stop()
            if self._log_handle is not None:
                self._log_handle.close()
                self._log_handle = None
            if self._workdir is not None:  # the default log goes with it; pass log_file to keep one
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
            self._stop_watchdog()
            return self._process.returncode

    def _end_process(self, grace: float, until_models_unloaded: bool = False) -> None:
        """SIGTERM to tritonserver; after `grace` seconds, or (`until_models_unloaded`) as soon as
        no model process is left, SIGKILL to its whole group; then reap the group."""
        proc = self._process
        pgid = proc.pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline:
                if until_models_unloaded and process_group_members(pgid) == [pgid]:
                    break
                time.sleep(_POLL_SECONDS)
            if proc.poll() is None:
                if not until_models_unloaded:
                    LOGGER.warning("tritonserver ignored SIGTERM for %.0fs; killing its process group", grace)
                self._killpg(pgid, signal.SIGKILL)
                proc.wait()
        self._reap_group(pgid)
        self._join_pump()
        if proc.stdout is not None:
            proc.stdout.close()

    @staticmethod
    def _killpg(pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def _reap_group(self, pgid: int, timeout: float = 5.0) -> None:
        """Wait for stragglers of the group (orphaned stubs) to go, then SIGKILL them."""
        deadline = time.monotonic() + timeout
        while process_group_members(pgid):
            if time.monotonic() > deadline:
                LOGGER.warning("killing leftover processes of tritonserver's group %d", pgid)
                self._killpg(pgid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
                while process_group_members(pgid) and time.monotonic() < deadline:
                    time.sleep(_POLL_SECONDS)
                return
            time.sleep(_POLL_SECONDS)

    def __enter__(self) -> "TritonServer":
        if self._process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else ("stopped" if self._process else "not started")
        return f"TritonServer({str(self.model_repository)!r}, ports={self.ports or self._requested_ports}, {state})"
