"""BLIP-2 Flan-T5 end to end: the served code equals transformers' generate() token for token.

Every T5 parity preset (Flan-T5-like gated-gelu with an untied head and d_kv != d_model/heads; T5
v1.0-like relu with a tied, rescaled head, a head width GroupQueryAttention cannot take and other
relative-position buckets; more decoder than encoder layers) is exported through the gate, then
decoded by the served pipeline in process, for every generation control, alone and side by side
with requests of other encoder lengths, and through the real tritonserver.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from blip2_triton.client import Blip2Client
from blip2_triton.families import FAMILIES
from blip2_triton.server.launcher import TritonServer

from . import conftest
from .conftest import random_image, run_together

T5_PRESETS = FAMILIES["t5"].parity_presets
MAX_NEW = 12
PROMPTS = ["", "a photo of", "Question: how many circles are there? Answer:"]
# Every control generate() takes; beams with and without a length penalty and early stopping.
CONTROLS = {
    "greedy": {},
    "beams": dict(num_beams=3),
    "beams-length-penalty": dict(num_beams=3, length_penalty=0.3, early_stopping=True),
    "repetition-penalty": dict(repetition_penalty=1.8),
    "no-repeat-ngram": dict(no_repeat_ngram_size=2),
    "min-new-tokens": dict(min_new_tokens=MAX_NEW),
    # Sampling draws from numpy's generator, not torch's: with top_k=1 the draw is forced, so
    # sampling's processing chain (temperature, top-k, top-p) must still give transformers' tokens.
    "sample-top-k-1": dict(do_sample=True, top_k=1, temperature=0.7, top_p=0.9, seed=3),
}


def reference(ckpt, image_seed: int, prompt: str, **controls) -> tuple[list[int], str]:
    """conftest.reference with the checkpoint's generation config, as the server decodes."""
    return conftest.reference(ckpt, image_seed, prompt, checkpoint_config=True,
                              **{"max_new_tokens": MAX_NEW, **controls})


@pytest.fixture(scope="module", params=T5_PRESETS)
def t5(request, exported):
    from blip2_triton.serving.pipeline import LocalPipeline

    ckpt, repo, report = exported(request.param)
    return ckpt, LocalPipeline(repo), report


def test_the_gate_checks_the_t5_graphs(t5):
    _, _, report = t5
    assert set(report.max_abs_diff) == {"vision_encoder", "qformer", "llm_encoder", "llm_decoder"}
    assert all(c["ok"] for c in report.checks)


@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_every_control_equals_transformers(t5, control):
    ckpt, pipeline, _ = t5
    for seed, prompt in enumerate(PROMPTS):
        ids, text = reference(ckpt, seed, prompt, **CONTROLS[control])
        result = pipeline(random_image(seed), prompt, max_new_tokens=MAX_NEW, **CONTROLS[control])
        assert (result.token_ids, result.text) == (ids, text), (prompt, control)


def test_a_seeded_sample_is_reproducible_and_differs_from_greedy(t5):
    _, pipeline, _ = t5
    controls = dict(do_sample=True, temperature=1.5, seed=7, max_new_tokens=MAX_NEW)
    first = pipeline(random_image(4), "a photo of", **controls).token_ids
    assert first == pipeline(random_image(4), "a photo of", **controls).token_ids
    others = {tuple(pipeline(random_image(4), "a photo of", **{**controls, "seed": s}).token_ids) for s in range(6)}
    assert len(others) > 1


def test_requests_of_different_encoder_lengths_share_steps(t5):
    """Greedy and beam requests with prompts of different lengths decode side by side in one
    engine (one decoder call per step, cross-attention masked per row) exactly as alone."""
    ckpt, pipeline, _ = t5
    jobs = [(random_image(10 + i), PROMPTS[i % 3], {"max_new_tokens": MAX_NEW, **c})
            for i, c in enumerate([{}, {"num_beams": 3}, {"min_new_tokens": 6}, {}, {"repetition_penalty": 1.5}])]
    together, engine = run_together(pipeline, jobs)
    for (image, prompt, controls), ids in zip(jobs, together):
        assert ids == pipeline(image, prompt, **controls).token_ids
    assert engine.stats.steps < sum(len(ids) for ids in together)  # steps were shared
    assert engine.cache.slots == 1  # released when idle


def test_context_limit_is_the_tokenizers_model_max_length(t5):
    from blip2_triton.errors import InvalidInput

    _, pipeline, _ = t5
    limit = pipeline.detokenizer.tokenizer.model_max_length  # transformers' tokenizer, which blip2 holds
    with pytest.raises(InvalidInput, match=rf"prompt: \d+ tokens, more than the {limit}"):
        pipeline(random_image(1), "circle " * (limit + 5))
    with pytest.raises(InvalidInput, match=f"max_new_tokens must be <= {limit}"):
        pipeline(random_image(1), "", max_new_tokens=limit + 1)


def test_streamed_pieces_concatenate_to_the_text_spaces_included(t5):
    _, pipeline, _ = t5
    pieces = []
    request = pipeline.service.prepare(random_image(5), b"a photo of", {"max_new_tokens": MAX_NEW}, stream=True,
                                       emit=pieces.append)
    ids = [int(t) for t in pipeline.generator.engine.generate(request)]
    text = "".join(p.text for p in pieces)
    assert text == pipeline.detokenizer.text(ids)
    assert [t for p in pieces for t in p.token_ids] == ids
    assert sum(1 for p in pieces if p.text) > 1, "a SentencePiece tokenizer's text streams, not only at the end"


@pytest.mark.server
@pytest.mark.parametrize("preset", T5_PRESETS)
def test_served_by_tritonserver_equals_transformers(exported, tmp_path, preset):
    """Each exported T5 repository on the real server: every control over gRPC (streamed and not),
    HTTP generate, requests sent concurrently, each equal to transformers."""
    import json
    import urllib.request

    ckpt, repo, _ = exported(preset)
    ports = dict(grpc_port=None, http_port=None, metrics_port=None)  # free ones: never another server's
    with TritonServer(repo, **ports, log_file=tmp_path / "server.log") as server, \
            Blip2Client(server.grpc_url, timeout=120) as client:
        jobs = [(seed, PROMPTS[seed % 3], name) for seed, name in enumerate(sorted(CONTROLS))]
        with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: they share the engine's steps
            results = list(pool.map(lambda job: client.generate(random_image(job[0]), job[1], max_new_tokens=MAX_NEW,
                                                                **CONTROLS[job[2]]), jobs))
        for (seed, prompt, name), result in zip(jobs, results):
            assert (result.token_ids, result.text) == reference(ckpt, seed, prompt, **CONTROLS[name]), name
        pieces = list(client.stream(random_image(2), PROMPTS[2], max_new_tokens=MAX_NEW))
        assert "".join(pieces) == reference(ckpt, 2, PROMPTS[2])[1]

        import base64
        body = json.dumps({"image": base64.b64encode(random_image(1)).decode(), "prompt": PROMPTS[1],
                           "max_new_tokens": MAX_NEW}).encode()
        with urllib.request.urlopen(urllib.request.Request(
                f"http://{server.http_url}/v2/models/blip2/generate", body, {"Content-Type": "application/json"}), timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["text"] == reference(ckpt, 1, PROMPTS[1])[1]
