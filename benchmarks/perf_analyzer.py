"""Cross-check with perf_analyzer, Triton's own load generator (run through perf_analyzer.sh).

perf_analyzer drives the `blip2` model (or `blip2_ensemble`, whose generator step is `blip2`) over
gRPC with --streaming (a decoupled model, which Triton serves only on the streaming RPC). For decoupled models it measures
latency to the FIRST response; the requests here do not ask to stream, so their first response is
their only one and the latency is the whole request's.
"""
from __future__ import annotations

import base64
import csv
import json
import struct
import subprocess
import time
from pathlib import Path

from blip2_triton import api

from .workloads import Workload

SCRIPT = Path(__file__).with_name("perf_analyzer.sh")


def serialized_bytes(value: bytes) -> bytes:
    """One BYTES element in Triton's wire format: little-endian uint32 length, then the bytes.

    perf_analyzer's {"b64": ...} data for a BYTES input is the serialized tensor, not the raw
    value: raw image bytes are read as a length prefix ("expecting string of length 3774863615").
    """
    return struct.pack("<I", len(value)) + value


def input_data(image: bytes, workload: Workload) -> dict:
    """perf_analyzer --input-data JSON for one request of `workload` on `image`."""
    step = {
        api.IMAGE.name: {"b64": base64.b64encode(serialized_bytes(image)).decode()},
        api.PROMPT.name: {"content": [workload.prompt], "shape": [1]},
    }
    for name, value in workload.controls.items():
        step[name] = {"content": [value], "shape": [1]}
    return {"data": [step]}


def run(grpc_url: str, image: bytes, workload: Workload, workdir: Path, concurrency_range: str = "1:8:7",
        requests_per_window: int = 8, timeout: float = 1200, model: str = api.PIPELINE) -> dict:
    """Run perf_analyzer against `model` on a live server; returns its CSV rows and output, or what
    failed. Its input, CSV and full output are left in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "perf_analyzer_input.json"
    data.write_text(json.dumps(input_data(image, workload)))
    report = workdir / "perf_analyzer.csv"
    report.unlink(missing_ok=True)
    args = [
        "-m", model, "-u", grpc_url, "-i", "grpc", "--streaming", "--input-data", str(data),
        "--concurrency-range", concurrency_range, "--measurement-mode", "count_windows",
        # A shared, noisy machine: accept any 3 windows (a cross-check, not the measurement).
        "--measurement-request-count", str(requests_per_window), "--max-trials", "5",
        "--stability-percentage", "200", "-f", str(report),
    ]
    out: dict = {"model": model, "workload": workload.name, "command": ["benchmarks/perf_analyzer.sh", *args]}
    if not SCRIPT.exists():
        return out | {"ok": False, "error": f"{SCRIPT} not found (perf_analyzer runs from a source checkout)"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return out | {"ok": False, "error": f"timed out after {timeout:.0f}s", "stdout_tail": _tail(e.stdout)}
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["returncode"] = proc.returncode
    out["stdout_tail"] = _tail(proc.stdout)
    out["stderr_tail"] = _tail(proc.stderr)
    (workdir / "perf_analyzer.out").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0 or not report.exists():
        return out | {"ok": False, "error": f"perf_analyzer exited with {proc.returncode}; see stdout_tail/stderr_tail"}
    with report.open() as f:
        rows = list(csv.DictReader(f))
    out["ok"] = True
    out["rows"] = [
        {
            "concurrency": int(r["Concurrency"]),
            "requests_per_s": float(r["Inferences/Second"]),
            "tokens_per_s": float(r["Inferences/Second"]) * workload.max_new_tokens,
            "p50_ms": int(r["p50 latency"]) / 1e3,
            "p90_ms": int(r["p90 latency"]) / 1e3,
            "p99_ms": int(r["p99 latency"]) / 1e3,
            "server_queue_ms": int(r["Server Queue"]) / 1e3,
            "server_compute_infer_ms": int(r["Server Compute Infer"]) / 1e3,
        }
        for r in rows
    ]
    return out


def _tail(text, lines: int = 40) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])
