"""A benchmark worker: one process hosting one system under test, driven over JSON lines.

    python -m blip2_triton.benchmarks.worker {transformers|local} <model> <threads>

The benchmark keeps a transformers worker and an in-process-pipeline worker alive next to the
server and sends them the same requests in turn, so that all three are measured side by side
under the same (shared, noisy) machine load, and each has a peak RSS of its own.

Protocol: the worker writes {"ready": info} once loaded; then reads one JSON object per line
({"op": ..., ...}) and answers one JSON object per line ({"ok": result} or {"error": message}).
Images are sent once ({"op": "images", "b64": [...]}) and then named by index.
"""
from __future__ import annotations

# A worker hosts one system: its imports inside functions load torch (transformers) or onnxruntime
# (our pipeline), never both in one process.

import base64
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path


def _peak_rss_mib() -> float:
    """Peak RSS of this process: VmHWM, which exec resets. (ru_maxrss would not do: Linux carries
    it over from the parent through fork and exec, so every worker would report the driver's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(kind: str, model: str, threads: int) -> int:
    # The protocol owns the real stdout; anything libraries print goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    start = time.perf_counter()
    if kind == "transformers":
        from .baseline import TransformersRunner

        runner = TransformersRunner(model, threads)
    elif kind == "local":
        from .stages import LocalRunner

        runner = LocalRunner(model, threads)
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    protocol.write(json.dumps({"ready": runner.info | {"load_seconds": time.perf_counter() - start,
                                                       "pid": os.getpid()}}) + "\n")
    images: list[bytes] = []
    for line in sys.stdin:
        message = json.loads(line)
        op = message.pop("op")
        try:
            if op == "quit":
                break
            if op == "images":
                images = [base64.b64decode(b) for b in message["b64"]]
                result = len(images)
            elif op == "memory":
                result = {"peak_rss_mib": _peak_rss_mib()}
            elif op == "batch":
                result = runner.batch([images[i] for i in message["images"]], message["prompt"], message["controls"])
            elif op == "decode_vs_rows":
                result = runner.decode_vs_rows(message["rows"], message["past_length"])
            elif op == "generate":
                result = runner.generate(images[message["image"]], message["prompt"], message["controls"])
            else:
                raise ValueError(f"unknown op {op!r}")
            protocol.write(json.dumps({"ok": result}) + "\n")
        except Exception as e:  # reported to the driver, which raises it there
            protocol.write(json.dumps({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}) + "\n")
    return 0


class WorkerError(RuntimeError):
    pass


class Worker:
    """Driver side: starts a worker process (loading in the background) and calls it."""

    def __init__(self, kind: str, model: str | Path, threads: int, log_file: Path | None = None):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        self.kind = kind
        self._log = open(log_file, "ab") if log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "blip2_triton.benchmarks.worker", kind, str(model), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1, env=env,
        )
        self.log_file = log_file
        self._info: dict | None = None

    @property
    def info(self) -> dict:
        """What the worker reports once loaded (load_seconds, thread counts, ...); waits for it."""
        if self._info is None:
            ready = self._read()
            if "ready" not in ready:
                raise WorkerError(f"{self.kind} worker did not start: {ready}")
            self._info = ready["ready"]
        return self._info

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise WorkerError(f"{self.kind} worker exited with code {code} (log: {self.log_file})")
        return json.loads(line)

    def call(self, op: str, **kwargs):
        self.info  # noqa: B018 - the first answer is the ready line
        self.process.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise WorkerError(f"{self.kind} worker, {op}: {answer['error']}\n{answer.get('traceback', '')}")
        return answer["ok"]

    def send_images(self, images: list[bytes]) -> None:
        self.call("images", b64=[base64.b64encode(b).decode() for b in images])

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], sys.argv[2], int(sys.argv[3])))
