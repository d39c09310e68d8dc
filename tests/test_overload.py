"""Overload against the real server: 64 concurrent 4-beam requests at the context limit, on a
tiny-opt server whose KV cache budget holds three of them and whose waiting line holds 16. Every
request is answered (the same answer as alone) or refused at once with ResourceExhaustedError;
at most three decode at a time and the cache never passes its budget; the server serves on."""
from __future__ import annotations

import asyncio
import re
import shutil
import threading
import time

import numpy as np
import pytest

from blip2_triton.client import AsyncBlip2Client, Blip2Client, ResourceExhaustedError
from blip2_triton.repository import KV_CACHE_BUDGET, MAX_QUEUE_SIZE
from blip2_triton.server import TritonServer
from blip2_triton.serving.step_gate import STEP_GATE_ENV, StepGateControl

from .conftest import metric, random_image, wait_for_active, wait_for_idle

pytestmark = pytest.mark.server
REQUESTS, BEAMS, FIT, QUEUE = 64, 4, 3, 16


def _set_parameter(config: str, key: str, value: str) -> str:
    pattern = rf'(parameters {{ key: "{key}" value: {{ string_value: )"[^"]*"'
    changed, count = re.subn(pattern, rf'\1"{value}"', config)
    assert count == 1, f"config.pbtxt has no parameter {key!r}"
    return changed


@pytest.fixture(scope="module")
def overload(exported, pipeline, tmp_path_factory):
    """(server, budget bytes, longest answer) for a copy of tiny-opt with the small budget and line."""
    _, repo, _ = exported("tiny-opt")
    lm = pipeline.generator.language_model
    room = lm.max_positions - lm.num_query_tokens - 1
    budget = lm.cache_bytes(FIT * BEAMS + 2, lm.cache_extent(np.zeros(1, np.int64), room))
    copy = tmp_path_factory.mktemp("overload") / "repo"
    shutil.copytree(repo, copy)
    config = copy / "blip2" / "config.pbtxt"
    text = _set_parameter(config.read_text(), KV_CACHE_BUDGET, str(budget))
    config.write_text(_set_parameter(text, MAX_QUEUE_SIZE, str(QUEUE)))
    with TritonServer(copy, grpc_port=None, http_port=None, metrics_port=None, env={STEP_GATE_ENV: "1"}) as server:
        yield server, budget, room


class _Gauges:
    """Peaks of the engine's gauges, read every few ms on a thread."""

    NAMES = ("blip2_active_sequences", "blip2_kv_cache_reserved_bytes", "blip2_kv_cache_bytes")

    def __init__(self, server):
        self.server, self.peak, self.readings = server, dict.fromkeys(self.NAMES, 0.0), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            for name in self.NAMES:
                self.peak[name] = max(self.peak[name], metric(self.server, name))
            self.readings += 1

    def __enter__(self) -> "_Gauges":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_64_concurrent_beam_requests_are_answered_or_refused_within_the_bounds(overload):
    server, budget, room = overload
    image = random_image(21)
    controls = dict(max_new_tokens=room, num_beams=BEAMS)
    with Blip2Client(server.grpc_url, timeout=120) as client:
        alone = client.generate(image, **controls)
    wait_for_idle(server)
    gate = StepGateControl(server.runtime_dir)
    taken = gate.close()  # the engine takes the first request and waits at the gate to prefill it

    async def main():
        async with AsyncBlip2Client(server.grpc_url, timeout=300) as c:
            tasks = [asyncio.ensure_future(c.generate(image, **controls)) for _ in range(REQUESTS)]
            await asyncio.to_thread(gate.wait_blocked, taken)
            deadline = time.monotonic() + 60  # the refusals come at once; the others wait
            while sum(t.done() for t in tasks) < REQUESTS - QUEUE:
                assert time.monotonic() < deadline, f"{sum(t.done() for t in tasks)} answered while held"
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            held = sum(not t.done() for t in tasks)
            with _Gauges(server) as gauges:
                gate.open()
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            return held, outcomes, gauges

    held, outcomes, gauges = asyncio.run(main())
    answers = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, ResourceExhaustedError)]
    assert len(answers) + len(refused) == REQUESTS, [o for o in outcomes if isinstance(o, BaseException)
                                                      and not isinstance(o, ResourceExhaustedError)][:3]
    # The line holds QUEUE, the one held at the gate while it is admitted included.
    assert len(answers) == held == QUEUE, (len(answers), held)
    assert all("max_queue_size" in e.message for e in refused), refused[0].message
    assert all(a.token_ids == alone.token_ids for a in answers)
    assert gauges.readings > 10
    assert 1 < gauges.peak["blip2_active_sequences"] <= FIT, gauges.peak
    assert 0 < gauges.peak["blip2_kv_cache_reserved_bytes"] <= budget, gauges.peak
    assert 0 < gauges.peak["blip2_kv_cache_bytes"] <= budget, gauges.peak
    wait_for_active(server, 0)
    assert metric(server, "blip2_kv_cache_reserved_bytes") == 0 == metric(server, "blip2_waiting_requests")
    assert server.is_ready()


def test_a_request_whose_cache_exceeds_the_whole_budget_is_refused(overload):
    server, budget, room = overload
    with Blip2Client(server.grpc_url, timeout=120) as client:
        with pytest.raises(ResourceExhaustedError, match="kv_cache_budget"):
            client.generate(random_image(22), max_new_tokens=room, num_beams=16)
        assert client.generate(random_image(22), max_new_tokens=3, num_beams=16).token_ids
