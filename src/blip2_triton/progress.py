"""Progress of long jobs (export, bench, training, indexing) on stderr, one implementation for all.

Steps are plain lines, `[  12.3 s] <label>: <message>`, so a terminal and a log file (CI, `nohup`,
a pipe) read the same; a phase of many items is a tqdm bar on a terminal and a few log lines
(start, every quarter, end) elsewhere.
"""
from __future__ import annotations

import resource
import sys
import time


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress:
    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled = label, enabled
        self.start = time.perf_counter()

    def say(self, message: str) -> None:
        """One step, with the time since the job started."""
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:7.1f} s] {self.label}: {message}", file=sys.stderr, flush=True)

    def phase(self, name: str, total: int, unit: str = "req"):
        """Something with update(n) and close() for `total` items."""
        if sys.stderr.isatty() and self.enabled:
            from tqdm import tqdm  # only on a terminal

            return tqdm(total=total, desc=f"  {name}", unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True)
        return _LogPhase(name, total, self.enabled)


class _LogPhase:
    """tqdm's update()/close() as log lines: at the start, every quarter and at the end."""

    def __init__(self, name: str, total: int, enabled: bool):
        self.name, self.total, self.enabled, self.done = name, max(total, 1), enabled, 0
        self.start = time.perf_counter()
        self._say(f"  {name}: {total} to do")

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        before = self.done * 4 // self.total
        self.done += n
        if self.done * 4 // self.total > before and self.done < self.total:
            self._say(f"  {self.name}: {self.done}/{self.total} ({time.perf_counter() - self.start:.0f}s)")

    def close(self) -> None:
        self._say(f"  {self.name}: done in {time.perf_counter() - self.start:.1f}s")
