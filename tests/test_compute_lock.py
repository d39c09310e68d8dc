"""The compute lock: one holder at a time across processes and threads; the served models ask for it."""
from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from blip2_triton.serving.compute_lock import ComputeLock
from blip2_triton.serving.triton_io import ModelArgs

HOLD = 0.15


def _hold(path, out):
    with ComputeLock(path):
        start = time.monotonic()
        time.sleep(HOLD)
        out.put((start, time.monotonic()))


def _disjoint(intervals) -> bool:
    intervals = sorted(intervals)
    return all(a_end <= b_start for (_, a_end), (b_start, _) in zip(intervals, intervals[1:]))


def test_processes_take_turns(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(tmp_path / "lock", out)) for _ in range(3)]
    for p in procs:
        p.start()
    intervals = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert _disjoint(intervals), intervals


def test_threads_of_one_process_take_turns(tmp_path):
    lock, intervals = ComputeLock(tmp_path / "lock"), []

    def hold():
        with lock:
            start = time.monotonic()
            time.sleep(HOLD / 3)
            intervals.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(intervals) == 4 and _disjoint(intervals), intervals


def test_one_lock_per_repository(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert ComputeLock.for_repository(a).path == ComputeLock.for_repository(a / ".." / "a").path
    assert ComputeLock.for_repository(a).path != ComputeLock.for_repository(b).path


def _args(tmp_path, value=None):
    import json

    params = {} if value is None else {"exclusive_compute": {"string_value": value}}
    return ModelArgs({"model_config": json.dumps({"parameters": params}), "model_name": "m",
                      "model_repository": str(tmp_path / "m"), "model_version": "1"})


def test_models_read_the_parameter(tmp_path):
    assert _args(tmp_path).compute_lock() is None
    assert _args(tmp_path, "false").compute_lock() is None
    assert _args(tmp_path, "TRUE").compute_lock().path == ComputeLock.for_repository(tmp_path).path
    with pytest.raises(ValueError, match="exclusive_compute"):
        _args(tmp_path, "yes").compute_lock()


def test_generated_configs_ask_for_it(exported):
    _, repo, _ = exported("tiny-opt")
    for model in ("vision_encoder", "qformer", "blip2"):
        text = (repo / model / "config.pbtxt").read_text()
        assert 'key: "exclusive_compute"' in text and 'string_value: "true"' in text, model
