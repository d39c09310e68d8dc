"""The image cache (serving/image_cache.py): LRU by bytes, one computation for concurrent requests
of a new image, nothing cached on failure; and Blip2Service through it in process: a hit runs no
image stage and gives the tokens a miss gives. The same through tritonserver: tests/test_image_cache_served.py."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from blip2_triton.errors import InvalidInput
from blip2_triton.serving.image_cache import ImageCache, image_key

from .conftest import random_image

ENTRY = np.zeros((4, 8), np.float32)  # 128 bytes


def entry(value: float) -> np.ndarray:
    return np.full_like(ENTRY, value)


def test_the_key_depends_on_the_bytes_and_the_settings():
    assert image_key(b"img", b"s") == image_key(b"img", b"s")
    assert image_key(b"img", b"s") != image_key(b"img2", b"s")
    assert image_key(b"img", b"s") != image_key(b"img", b"t")
    assert image_key(b"ab", b"c") != image_key(b"b", b"ca")  # settings and bytes cannot trade places


def test_a_hit_returns_the_stored_embeddings_without_computing():
    cache = ImageCache(10 * ENTRY.nbytes)
    assert cache.get_or_compute(b"a", lambda: entry(1))[1] is False
    value, hit = cache.get_or_compute(b"a", lambda: pytest.fail("computed on a hit"))
    assert hit and np.array_equal(value, entry(1))
    assert not value.flags.writeable  # shared by every request that hits it
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_eviction_keeps_the_byte_bound_and_drops_the_least_recently_used():
    cache = ImageCache(3 * ENTRY.nbytes)
    for key in (b"a", b"b", b"c"):
        cache.get_or_compute(key, lambda: entry(0))
    cache.get_or_compute(b"a", lambda: pytest.fail("a is cached"))  # a is now the most recent
    cache.get_or_compute(b"d", lambda: entry(0))  # evicts b, the least recently used
    assert b"b" not in cache and all(k in cache for k in (b"a", b"c", b"d"))
    assert cache.nbytes == 3 * ENTRY.nbytes <= cache.max_bytes
    assert (cache.stats.evictions, cache.stats.bytes, cache.stats.entries) == (1, 3 * ENTRY.nbytes, 3)
    big = np.zeros(4 * ENTRY.size, np.float32)
    cache.get_or_compute(b"big", lambda: big)  # larger than the bound: served, never stored
    assert b"big" not in cache and len(cache) == 3


def test_a_failed_computation_caches_nothing():
    cache = ImageCache(10 * ENTRY.nbytes)

    def corrupt():
        raise InvalidInput("image: cannot decode")

    for _ in range(2):
        with pytest.raises(InvalidInput):
            cache.get_or_compute(b"bad", corrupt)
    assert b"bad" not in cache and cache.nbytes == 0
    assert cache.stats.misses == 2


def test_concurrent_requests_for_a_new_image_compute_it_once():
    cache = ImageCache(10 * ENTRY.nbytes)
    calls, release = [], threading.Event()

    def slow():
        calls.append(1)
        release.wait(10)
        return entry(7)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute(b"x", slow))) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # let every thread reach the cache; correctness does not depend on it
    release.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert len(results) == 8 and all(np.array_equal(v, entry(7)) for v, _ in results)
    assert sorted(hit for _, hit in results) == [False] + [True] * 7


def test_waiters_compute_for_themselves_when_the_first_request_fails():
    """The first request's failure may be its own (its prompt): the others must not inherit it."""
    cache = ImageCache(10 * ENTRY.nbytes)
    started, release = threading.Event(), threading.Event()

    def failing():
        started.set()
        release.wait(10)
        raise InvalidInput("prompt: not valid UTF-8")

    errors = []

    def first():
        try:
            cache.get_or_compute(b"x", failing)
        except InvalidInput as e:
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    started.wait(10)
    result = []
    waiter = threading.Thread(target=lambda: result.append(cache.get_or_compute(b"x", lambda: entry(3))))
    waiter.start()
    time.sleep(0.1)
    release.set()
    t.join(10)
    waiter.join(10)
    assert len(errors) == 1
    value, hit = result[0]
    assert not hit and np.array_equal(value, entry(3)) and b"x" in cache


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="max_bytes"):
        ImageCache(-1)


# ---- Blip2Service with a cache, in process --------------------------------------------------------
class CountingStages:
    """LocalStages that count their runs."""

    def __init__(self, stages):
        self.stages, self.runs = stages, {"preprocess": 0, "query_embeds": 0}

    def preprocess(self, image, prompt):
        self.runs["preprocess"] += 1
        return self.stages.preprocess(image, prompt)

    def query_embeds(self, pixels):
        self.runs["query_embeds"] += 1
        return self.stages.query_embeds(pixels)


@pytest.fixture(scope="module")
def cached_service(exported):
    from blip2_triton.serving.service import Blip2Service, LocalStages

    _, repo, _ = exported("tiny-opt")
    stages = CountingStages(LocalStages(repo))
    service = Blip2Service(repo, stages, image_cache=ImageCache(2**20))
    return service, stages


def run(service, image: bytes, prompt: str, **controls) -> list[int]:
    request = service.prepare(image, prompt.encode(), dict(max_new_tokens=8, **controls))
    return [int(t) for t in service.engine.generate(request)]


def test_a_hit_runs_no_image_stage_and_gives_the_tokens_of_a_miss(cached_service, pipeline):
    service, stages = cached_service
    image = random_image(41)
    questions = ["Question: what color is the circle? Answer:", "Question: how many shapes? Answer:", ""]
    uncached = [[int(t) for t in pipeline(image, q, max_new_tokens=8).token_ids] for q in questions]
    before = dict(stages.runs)
    tokens = [run(service, image, q) for q in questions]
    assert tokens == uncached
    assert stages.runs["query_embeds"] - before["query_embeds"] == 1
    assert stages.runs["preprocess"] - before["preprocess"] == 1  # the hits tokenize their prompts themselves


def test_a_hit_still_refuses_a_bad_prompt_and_bad_controls(cached_service):
    service, stages = cached_service
    image = random_image(42)
    run(service, image, "a photo of")
    with pytest.raises(InvalidInput, match="UTF-8"):
        service.prepare(image, b"\xff\xfe", {})
    with pytest.raises(InvalidInput, match="context"):
        service.prepare(image, ("circle " * 400).encode(), {})
    with pytest.raises(InvalidInput, match="top_p"):
        service.prepare(image, b"", {"top_p": 2.0, "do_sample": True})
