"""End to end through the real server over gRPC: single requests, streams, concurrent clients, memory.

Non-streaming requests go through the project's client (`AsyncBlip2Client.generate`). Streaming
requests are timed one response at a time: time to first token is when the first response
arrives, whether or not its text is empty (random-weight models often emit tokens that decode to
no text, or to half a UTF-8 character the detokenizer holds back).
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid

from blip2_triton import api
from blip2_triton.client import AsyncBlip2Client
from blip2_triton.client.aio import build_inputs
from blip2_triton.client.options import GenerationOptions

from .workloads import Workload


async def request(client: AsyncBlip2Client, image: bytes, workload: Workload) -> dict:
    """One non-streaming request: seconds, token ids, text."""
    start = time.perf_counter()
    result = await client.generate(image, workload.prompt, **workload.controls)
    return {"seconds": time.perf_counter() - start, "tokens": list(result.token_ids), "text": result.text}


def stream_client(url: str):
    """A tritonclient gRPC aio client for `stream` (create it inside the running event loop)."""
    from tritonclient.grpc.aio import InferenceServerClient

    return InferenceServerClient(url)


async def stream(client, image: bytes, workload: Workload, timeout: float = 300.0) -> dict:
    """One streaming request on an open `stream_client` (so that no connection set-up is timed):
    seconds to the first response and to the final one, per-response gaps."""
    inputs = build_inputs(image, workload.prompt, True, GenerationOptions.from_kwargs(workload.controls))
    rid = uuid.uuid4().hex

    async def requests():
        yield {"model_name": api.PIPELINE, "inputs": inputs, "request_id": rid}

    arrivals, tokens = [], []
    start = time.perf_counter()
    responses = client.stream_infer(requests(), stream_timeout=timeout)
    try:
        async for result, error in responses:
            if error is not None:
                raise RuntimeError(f"streaming request failed: {error}")
            arrivals.append(time.perf_counter())
            ids = result.as_numpy(api.TOKEN_IDS.name)
            tokens += ids.reshape(-1).tolist() if ids is not None else []
            final = result.as_numpy(api.FINAL.name)
            if final is not None and bool(final.reshape(-1)[0]):
                break
    finally:
        responses.cancel()
    return {
        "seconds": arrivals[-1] - start,
        "ttft": arrivals[0] - start,
        "inter_token": [b - a for a, b in zip(arrivals, arrivals[1:])],
        "responses": len(arrivals),
        "tokens": tokens,
    }


async def closed_loop(url: str, streams: int, per_stream: int, images: list[bytes], workload: Workload) -> dict:
    """`streams` clients, each sending `per_stream` requests back to back (a new one as soon as
    the previous answer arrives). Returns wall time, requests and tokens per second, latencies."""
    clients = [AsyncBlip2Client(url, timeout=600) for _ in range(streams)]
    latencies: list[float] = []
    tokens = 0

    async def one_client(index: int):
        nonlocal tokens
        for k in range(per_stream):
            r = await request(clients[index], images[(index + k * streams) % len(images)], workload)
            latencies.append(r["seconds"])
            tokens += len(r["tokens"])

    try:
        await asyncio.gather(*(c.is_ready() for c in clients))  # connect before the clock starts
        start = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(streams)))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return {
        "streams": streams,
        "requests": len(latencies),
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "latencies": latencies,
    }


class GroupMemorySampler:
    """Samples the RSS of every process in a process group (tritonserver and its Python-backend
    stubs) every `interval` seconds on a background thread; keeps the peak of the sum and each
    process's own peak (labelled by model instance)."""

    def __init__(self, pgid: int, interval: float = 0.25):
        self.pgid = pgid
        self.interval = interval
        self.peak_total = 0
        self.peak_by_process: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._labels: dict[int, str] = {}

    def _label(self, proc) -> str:
        if proc.pid not in self._labels:
            try:
                cmd = proc.cmdline()
            except Exception:  # noqa: BLE001 - the process may be gone; label it by pid
                cmd = []
            if cmd and cmd[0].endswith("triton_python_backend_stub") and len(cmd) > 2:
                label = f"stub:{cmd[-2]}"  # the model instance name, e.g. blip2_0_0
            elif cmd:
                label = cmd[0].rsplit("/", 1)[-1]
            else:
                label = f"pid {proc.pid}"
            self._labels[proc.pid] = label
        return self._labels[proc.pid]

    def sample(self) -> dict[str, int]:
        import psutil

        from blip2_triton.server.launcher import process_group_members

        sizes = {}
        for pid in process_group_members(self.pgid):
            try:
                proc = psutil.Process(pid)
                sizes[self._label(proc)] = proc.memory_info().rss
            except psutil.Error:
                continue
        return sizes

    def pss(self) -> dict[str, int]:
        """Proportional set size per process now (shared pages split between their users)."""
        import psutil

        from blip2_triton.server.launcher import process_group_members

        sizes = {}
        for pid in process_group_members(self.pgid):
            try:
                proc = psutil.Process(pid)
                sizes[self._label(proc)] = proc.memory_full_info().pss
            except (psutil.Error, AttributeError):
                continue
        return sizes

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = self.sample()
            self.samples += 1
            self.peak_total = max(self.peak_total, sum(sizes.values()))
            for label, size in sizes.items():
                self.peak_by_process[label] = max(self.peak_by_process.get(label, 0), size)
            self._stop.wait(self.interval)

    def start(self) -> "GroupMemorySampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
