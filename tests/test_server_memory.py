"""Per-process server memory (server/memory.py, benchmarks/server_memory.py): the measurement itself,
its record, and what it shows on a real server (the preprocess model without torch)."""
from __future__ import annotations

import json
import os

import pytest

from blip2_triton.server.memory import ANONYMOUS, process_memory, smaps_by_mapping


def test_process_memory_of_this_process():
    m = process_memory(os.getpid())
    assert 0 < m.uss <= m.pss <= m.rss
    assert m.anonymous + m.file == m.rss and m.anonymous > 0
    assert ANONYMOUS in m.mappings and len(m.mappings) <= 8
    by_mapping = smaps_by_mapping(os.getpid())
    # smaps and psutil read the same pages (a little may move between the two reads).
    assert abs(sum(v["rss"] for v in by_mapping.values()) - m.rss) < 0.05 * m.rss


def test_server_memory_record_round_trips_and_renders():
    from blip2_triton.benchmarks.records import ProcessMemoryRecord, ServerMemory

    proc = ProcessMemoryRecord.of(process_memory(os.getpid()))
    record = ServerMemory(weights_mib=100.0, requests=3, idle={"a": proc}, after_requests={"a": proc})
    again = ServerMemory.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    assert record.target_mib == round(1.15 * 100 + 0.6 * 1024, 1)
    assert "| a |" in record.table() and "target (1.15x + 0.6 GiB)" in record.table()


@pytest.mark.server
def test_a_served_repository_per_process(served):
    """Every model's stub and tritonserver are measured; the preprocess model maps no libtorch."""
    from blip2_triton.benchmarks.server_memory import snapshot

    processes = snapshot(served.server.pgid)
    assert {"tritonserver", "preprocess", "vision_encoder", "qformer", "blip2"} <= set(processes)
    assert not processes["preprocess"].torch
    assert all(p.pss_mib > 0 for p in processes.values())
