"""The engine's memory bounds without a server: the KV cache byte budget (admission waits, the
cache never grows past it, a request too large alone is refused), the bounded waiting line, and
the `kv_cache_budget` setting."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from blip2_triton.errors import ResourceExhausted
from blip2_triton.serving.engine import DEFAULT_KV_BUDGET_SHARE, Engine, EngineStats, kv_budget, machine_memory

from .conftest import random_image

BEAMS = 4


def _request(pipeline, seed: int, max_new: int, on_done):
    pixels, ids = pipeline.stages.preprocess(random_image(seed), b"")
    query = pipeline.stages.query_embeds(pixels)
    return pipeline.generator.request(query, ids, {"max_new_tokens": max_new, "num_beams": BEAMS},
                                      on_tokens=lambda i, n, final: final and on_done(seed, list(i)),
                                      on_error=lambda e: on_done(seed, e))


def test_the_cache_never_outgrows_its_budget_and_every_request_is_answered(pipeline):
    """Budget for two 4-beam requests at the context limit, six submitted: at most two decode at a
    time, the cache's buffers never pass the budget, and every answer equals the one alone."""
    lm = pipeline.generator.language_model
    room = lm.max_positions - lm.num_query_tokens - 1  # the longest answer the context allows
    probe = _request(pipeline, 0, room, lambda *a: None)
    budget = lm.cache_bytes(2 * BEAMS, probe.extent)
    engine_ref = {}

    class Watch(EngineStats):
        peak_active = peak_bytes = 0

        def on_step(self, sequences):
            super().on_step(sequences)
            Watch.peak_active = max(Watch.peak_active, sequences)
            Watch.peak_bytes = max(Watch.peak_bytes, engine_ref["engine"].cache.nbytes)

    engine = engine_ref["engine"] = Engine(lm, stats=Watch(), kv_budget=budget)
    results, done = {}, threading.Event()

    def on_done(seed, outcome):
        results[seed] = outcome
        if len(results) == 6:
            done.set()

    for seed in range(6):
        engine.submit(_request(pipeline, seed, room, on_done))
    engine.start()
    try:
        assert done.wait(300), f"{len(results)} of 6 answered"
    finally:
        engine.stop()
    assert Watch.peak_active == 2, Watch.peak_active
    assert 0 < Watch.peak_bytes <= budget, (Watch.peak_bytes, budget)
    for seed in range(6):
        alone = pipeline(random_image(seed), "", max_new_tokens=room, num_beams=BEAMS).token_ids
        assert results[seed] == alone


def test_a_request_larger_than_the_whole_budget_is_refused_before_any_work(pipeline):
    lm = pipeline.generator.language_model
    engine = Engine(lm, kv_budget=lm.cache_bytes(BEAMS, lm.cache_extent(np.zeros(1, np.int64), 8)))
    pipeline.generator.engine, saved = engine, pipeline.generator.engine
    try:
        with pytest.raises(ResourceExhausted, match="kv_cache_budget"):
            pipeline.service.prepare(b"junk: not even read", b"", {"max_new_tokens": 60, "num_beams": BEAMS})
        assert pipeline.service.prepare(random_image(1), b"", {"max_new_tokens": 4, "num_beams": BEAMS})
    finally:
        pipeline.generator.engine = saved


def test_the_waiting_line_is_bounded_and_places_come_back(pipeline):
    engine = Engine(pipeline.generator.language_model, max_waiting=2)
    first, second = engine.enter(), engine.enter()
    with pytest.raises(ResourceExhausted, match="2 requests are waiting already"):
        engine.enter()
    first.release()
    first.release()  # idempotent: the place is given back once
    third = engine.enter()
    with pytest.raises(ResourceExhausted):
        engine.enter()
    second.release(), third.release()


def test_a_place_is_given_back_when_the_engine_takes_its_request(pipeline):
    engine = Engine(pipeline.generator.language_model, max_waiting=1)
    request = _request(pipeline, 1, 3, lambda *a: None)
    request.place = engine.enter()
    engine.submit(request)
    with pytest.raises(ResourceExhausted):
        engine.enter()
    engine.start()
    try:
        for _ in range(1000):
            try:
                engine.enter().release()
                break
            except ResourceExhausted:
                threading.Event().wait(0.01)
        else:
            pytest.fail("the place never came back")
    finally:
        engine.stop()


@pytest.mark.parametrize("value,expected", [("1048576", 2**20), ("512KiB", 512 * 2**10), ("64MiB", 64 * 2**20),
                                            ("1.5GiB", int(1.5 * 2**30)), (" 2 GiB ", 2 * 2**30)])
def test_kv_cache_budget_sizes(value, expected):
    assert kv_budget(value) == expected


def test_kv_cache_budget_auto_is_a_share_of_the_machine():
    assert kv_budget("auto") == int(machine_memory() * DEFAULT_KV_BUDGET_SHARE) > 0


@pytest.mark.parametrize("value", ["", "lots", "-1MiB", "0", "12 TB"])
def test_bad_kv_cache_budgets_are_named(value):
    with pytest.raises(ValueError, match="kv_cache_budget must be"):
        kv_budget(value)
