"""One onnxruntime run at a time across all of a server's processes, each run using every core.

The server runs its graphs in separate processes (the vision encoder, the Q-Former, the decoder in
`blip2`), each with an onnxruntime thread pool as wide as the machine. Under concurrent requests
they ran side by side: twice as many busy threads as cores, and onnxruntime's pools, which wait
for all their threads at every parallel section, lose far more than half their speed when the
kernel deschedules one of them. Taking turns, each run gets the whole machine as it does alone.
benchmarks/README.md has the throughput with and without the lock.

A file lock (flock) is shared by every process that opens the same file; a thread lock in front
of it keeps two threads of one process from both holding it through one open file.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import threading
from pathlib import Path

# The runtime directory of the server a process belongs to (set by server.launcher.TritonServer).
RUNTIME_DIR_ENV = "BLIP2_TRITON_RUNTIME_DIR"


class ComputeLock:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        # Read-only is enough for flock, and opens a lock file that another user created.
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDONLY, 0o666)
        self._threads = threading.Lock()

    @classmethod
    def for_repository(cls, repository: str | Path, runtime_dir: str | Path | None = None) -> "ComputeLock":
        """The lock of every model served from `repository`: a file in the server's runtime
        directory (`runtime_dir`, else RUNTIME_DIR_ENV, which the launcher sets for the server's
        processes), so that it goes when the server does; else in the temp directory. Never in
        the repository, which may be read-only."""
        directory = runtime_dir or os.environ.get(RUNTIME_DIR_ENV) or tempfile.gettempdir()
        digest = hashlib.sha1(str(Path(repository).resolve()).encode()).hexdigest()[:16]
        return cls(Path(directory) / f"blip2-triton-compute-{digest}.lock")

    def __enter__(self) -> "ComputeLock":
        self._threads.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()
