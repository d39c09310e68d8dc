"""The `blip2` model's per-stage metrics (prefill, decode step, detokenization) and its time to
first token, read from a real tritonserver's metrics endpoint as differences around known requests."""
from __future__ import annotations

import pytest

from blip2_triton.benchmarks.stages import blip2_metrics, triton_statistics
from blip2_triton.client import Blip2Client
from blip2_triton.server.launcher import TritonServer

from .conftest import random_image

pytestmark = pytest.mark.server
TOKENS = 6


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    _, repo, _ = exported("tiny-opt")
    log = tmp_path_factory.mktemp("logs") / "metrics.log"
    with TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None, log_file=log) as server:
        with Blip2Client(server.grpc_url, timeout=60) as client:
            client.caption(random_image(0), max_new_tokens=2)  # warm-up, outside every delta
            yield server, client


def delta(server, run) -> dict[str, float]:
    before = blip2_metrics(server.metrics_url)
    run()
    after = blip2_metrics(server.metrics_url)
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def test_stage_counts_follow_requests_and_decode_steps(server):
    server, client = server
    requests = 3
    d = delta(server, lambda: [client.caption(random_image(i), max_new_tokens=TOKENS, min_new_tokens=TOKENS)
                               for i in range(requests)])
    assert d["blip2_prefill_seconds_count"] == requests
    # one request at a time: every step after the prefill's token is one decoder call of one row
    assert d["blip2_decode_step_seconds_count"] == d["blip2_decode_steps_total"] == requests * (TOKENS - 1)
    assert d["blip2_detokenize_seconds_count"] == requests  # one answer each, not streamed
    for stage in ("prefill", "decode_step", "detokenize"):
        assert d[f"blip2_{stage}_seconds_sum"] > 0, stage
    # a step of the tiny decoder takes well under a second and more than a microsecond
    assert 1e-6 < d["blip2_decode_step_seconds_sum"] / d["blip2_decode_step_seconds_count"] < 1.0


def test_streaming_detokenizes_every_token_and_publishes_before_the_answer(server):
    server, client = server
    d = delta(server, lambda: list(client.stream(random_image(7), max_new_tokens=TOKENS, min_new_tokens=TOKENS)))
    assert d["blip2_detokenize_seconds_count"] == TOKENS
    assert d["blip2_prefill_seconds_count"] == 1
    assert d["blip2_decode_step_seconds_count"] == TOKENS - 1


def test_time_to_first_token_counts_from_receipt_including_image_stages(server):
    """TTFT starts when execute() receives the request: it contains the three BLS stages' compute
    (Triton's statistics) and the prefill, which an engine-side start would leave out."""
    server, client = server
    stats_before = triton_statistics(server.grpc_url)
    d = delta(server, lambda: client.caption(random_image(3), max_new_tokens=TOKENS, min_new_tokens=TOKENS))
    stats_after = triton_statistics(server.grpc_url)
    image_stages = sum(
        (stats_after[m]["compute_infer_ns"] - stats_before[m]["compute_infer_ns"]) / 1e9
        for m in ("preprocess", "vision_encoder", "qformer"))
    assert d["blip2_time_to_first_token_seconds_count"] == 1
    assert image_stages > 0
    assert d["blip2_time_to_first_token_seconds_sum"] > image_stages + d["blip2_prefill_seconds_sum"]


def test_thread_count_from_the_environment_is_validated(monkeypatch):
    from blip2_triton.serving.onnx_graph import THREADS_ENV, threads_from_env

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert threads_from_env() is None  # onnxruntime's default
    monkeypatch.setenv(THREADS_ENV, "3")
    assert threads_from_env() == 3
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(ValueError, match=THREADS_ENV):
            threads_from_env()


def test_every_session_without_a_count_takes_the_environment_s(exported, monkeypatch):
    from blip2_triton import repository, specs
    from blip2_triton.serving.onnx_graph import THREADS_ENV, OnnxGraph, make_session

    _, repo, _ = exported("tiny-opt")
    vision = repository.graph_path(repo, specs.VISION_ENCODER)
    monkeypatch.setenv(THREADS_ENV, "1")
    assert OnnxGraph(vision).session.get_session_options().intra_op_num_threads == 1
    # An explicit count wins over the environment.
    assert make_session(vision, threads=2).get_session_options().intra_op_num_threads == 2
