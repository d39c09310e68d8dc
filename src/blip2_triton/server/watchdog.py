"""Stops a tritonserver whose owner went away, and removes the server's runtime directory.

    python -m blip2_triton.server.watchdog PGID RUNTIME_DIR     (stdin: a pipe from the owner)

TritonServer starts one beside each server. Only the owner holds the pipe's write end, so this
process reads EOF when the owner closes it in stop(), or when the owner dies in any way, SIGKILL
included (the kernel closes a dead process's files). It then does what stop() would: SIGTERM to
tritonserver (the group leader), SIGKILL to the whole group after a grace period, and the runtime
directory removed. Run by an owner that stopped cleanly, it finds nothing left to do. When the
owner restarts tritonserver (TritonServer.restart), it writes the new process group's id on the
pipe, one line.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time

from blip2_triton.server.launcher import process_group_members

GRACE_SECONDS = 5.0


def _signal_group(pgid: int, sig: int, leader_only: bool = False) -> None:
    try:
        os.kill(pgid, sig) if leader_only else os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str]) -> int:
    pgid, runtime_dir = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the owner must not skip cleanup
    for line in sys.stdin.buffer:  # until EOF; a line is the process group of a restarted server
        pgid = int(line)
    if process_group_members(pgid):
        _signal_group(pgid, signal.SIGTERM, leader_only=True)  # models unload, stubs finalize
        deadline = time.monotonic() + GRACE_SECONDS
        while process_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(pgid, signal.SIGKILL)
        while process_group_members(pgid) and time.monotonic() < deadline + GRACE_SECONDS:
            time.sleep(0.1)
    shutil.rmtree(runtime_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
