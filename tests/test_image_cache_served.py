"""The image cache through a real tritonserver: a follow-up question on an image runs no image stage
(Triton's per-model statistics), its text still equals transformers, concurrent questions on a new
image run the stages once, a corrupt image is never cached, the byte bound evicts, and the config
switch turns the cache off. Images are seeds no other test of the shared server sends."""
from __future__ import annotations

import math
import shutil

import pytest

from blip2_triton import api, repository, specs
from blip2_triton.benchmarks.stages import triton_statistics
from blip2_triton.client import Blip2Client, InvalidArgumentError
from blip2_triton.server.launcher import TritonServer

from .conftest import metric, random_image, reference

pytestmark = pytest.mark.server
MAX_NEW = 8
STAGES = (api.PREPROCESS, specs.VISION_ENCODER, specs.QFORMER)
QUESTIONS = ["what color is the circle?", "how many shapes are there?", "what is in the picture?"]


def vqa(question: str) -> str:
    return f"Question: {question} Answer:"


def stage_runs(server) -> dict[str, int]:
    """Requests each image stage and `blip2` have served so far (Triton's statistics)."""
    stats = triton_statistics(server.grpc_url)
    return {m: stats[m]["inference_count"] for m in (*STAGES, api.PIPELINE)}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def cache_metrics(server) -> dict[str, float]:
    names = ("hits_total", "misses_total", "evictions_total", "bytes", "entries")
    return {n: metric(server, f"blip2_image_cache_{n}") for n in names}


def test_follow_up_questions_skip_the_image_stages_and_equal_transformers(served):
    ckpt, server, client = served
    seed = 1401
    before = stage_runs(server)
    metrics_before = cache_metrics(server)
    first = client.ask(random_image(seed), QUESTIONS[0], max_new_tokens=MAX_NEW)
    after_first = stage_runs(server)
    follow_ups = [client.ask(random_image(seed), q, max_new_tokens=MAX_NEW) for q in QUESTIONS[1:]]
    after = stage_runs(server)
    assert delta(after_first, before) == {m: 1 for m in (*STAGES, api.PIPELINE)}
    assert delta(after, after_first) == {**{m: 0 for m in STAGES}, api.PIPELINE: 2}
    for question, result in zip(QUESTIONS, [first, *follow_ups]):
        assert result.text == reference(ckpt, seed, vqa(question), max_new_tokens=MAX_NEW)[1], question
    m = cache_metrics(server)
    assert m["hits_total"] - metrics_before["hits_total"] == 2
    assert m["misses_total"] - metrics_before["misses_total"] == 1
    assert m["bytes"] > 0 and m["entries"] >= 1


def test_concurrent_questions_on_a_new_image_run_the_image_stages_once(served):
    ckpt, server, client = served
    seed = 1402
    questions = QUESTIONS * 3
    before = stage_runs(server)
    results = client.ask_many(random_image(seed), questions, max_new_tokens=MAX_NEW)
    d = delta(stage_runs(server), before)
    assert d[specs.VISION_ENCODER] == d[specs.QFORMER] == 1
    assert d[api.PIPELINE] == len(questions)
    expected = {q: reference(ckpt, seed, vqa(q), max_new_tokens=MAX_NEW)[1] for q in QUESTIONS}
    assert [r.text for r in results] == [expected[q] for q in questions]


def test_a_corrupt_image_is_never_cached(served):
    _, server, client = served
    corrupt = b"\x89PNG\r\n\x1a\n garbage 1403"
    before, metrics_before = stage_runs(server), cache_metrics(server)
    for _ in range(2):
        with pytest.raises(InvalidArgumentError, match="image: cannot decode"):
            client.ask(corrupt, QUESTIONS[0], max_new_tokens=MAX_NEW)
    assert delta(stage_runs(server), before)[api.PREPROCESS] == 2  # decoded, and refused, each time
    m = cache_metrics(server)
    assert m["misses_total"] - metrics_before["misses_total"] == 2
    assert m["hits_total"] == metrics_before["hits_total"]
    assert m["bytes"] == metrics_before["bytes"]


# ---- servers with other cache settings ------------------------------------------------------------
def entry_bytes(ckpt) -> int:
    """Bytes one image's query embeddings take: [Q, E] of the Q-Former's output dtype."""
    import numpy as np
    from transformers import AutoConfig

    from blip2_triton.families import graph_specs

    spec = graph_specs(AutoConfig.from_pretrained(ckpt))[specs.QFORMER].output(specs.QUERY_EMBEDS)
    return int(np.prod(spec.dims[1:])) * np.dtype(spec.dtype).itemsize


@pytest.fixture(scope="module")
def reconfigured(exported, tmp_path_factory):
    """-> start(image_cache_bytes): tiny-opt served from a copy of its repository whose `blip2`
    config has that image-cache setting (None: off)."""
    import contextlib

    from transformers import AutoConfig

    from blip2_triton.export.repository_writer import write_repository

    ckpt, repo, _ = exported("tiny-opt")
    stack = contextlib.ExitStack()

    def start(image_cache_bytes):
        copy = tmp_path_factory.mktemp("repo") / "repo"
        shutil.copytree(repo, copy)
        write_repository(copy, AutoConfig.from_pretrained(ckpt), image_cache_bytes=image_cache_bytes)
        server = stack.enter_context(TritonServer(copy, grpc_port=None, http_port=None, metrics_port=None,
                                                  log_file=copy.parent / "tritonserver.log"))
        return server, stack.enter_context(Blip2Client(server.grpc_url, timeout=60))

    with stack:
        yield ckpt, start


def test_the_byte_bound_evicts_the_least_recently_used_image(reconfigured):
    ckpt, start = reconfigured
    size = entry_bytes(ckpt)
    server, client = start(2 * size + size // 2)  # room for two images
    a, b, c = (random_image(s) for s in (1411, 1412, 1413))
    for image in (a, b, c):
        client.ask(image, QUESTIONS[0], max_new_tokens=MAX_NEW)
    m = cache_metrics(server)
    assert (m["evictions_total"], m["entries"], m["bytes"]) == (1, 2, 2 * size)
    before = stage_runs(server)
    client.ask(c, QUESTIONS[1], max_new_tokens=MAX_NEW)  # still cached
    assert delta(stage_runs(server), before)[specs.VISION_ENCODER] == 0
    result = client.ask(a, QUESTIONS[1], max_new_tokens=MAX_NEW)  # evicted: runs the stages again
    assert delta(stage_runs(server), before)[specs.VISION_ENCODER] == 1
    assert result.text == reference(ckpt, 1411, vqa(QUESTIONS[1]), max_new_tokens=MAX_NEW)[1]
    m = cache_metrics(server)
    assert (m["evictions_total"], m["entries"], m["bytes"]) == (2, 2, 2 * size)


def test_the_switch_turns_the_cache_off(reconfigured):
    ckpt, start = reconfigured
    server, client = start(None)
    config = (server.model_repository / api.PIPELINE / "config.pbtxt").read_text()
    assert f'key: "{repository.IMAGE_CACHE}" value: {{ string_value: "false" }}' in config
    before = stage_runs(server)
    texts = [client.ask(random_image(1421), q, max_new_tokens=MAX_NEW).text for q in QUESTIONS[:2]]
    assert delta(stage_runs(server), before) == {m: 2 for m in (*STAGES, api.PIPELINE)}
    assert texts == [reference(ckpt, 1421, vqa(q), max_new_tokens=MAX_NEW)[1] for q in QUESTIONS[:2]]
    assert math.isnan(metric(server, "blip2_image_cache_hits_total"))  # no cache, no cache metrics
