"""Export progress as plain lines on stderr: one per step as it starts, so a terminal and a log file
(CI, `nohup`, a pipe) read the same, and a long step shows what is running and since when."""
from __future__ import annotations

import resource
import sys
import time


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        """`[  12.3 s] export: <message>`, with the time since the export started."""
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:7.1f} s] export: {message}", file=sys.stderr, flush=True)
