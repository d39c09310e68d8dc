"""Serving logic without a server: config generation, preprocessing, detokenization, the engine."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from blip2_triton import interface as api
from blip2_triton import repository, specs
from blip2_triton.pbtxt import ConfigError, ModelConfig, Tensor, render
from blip2_triton.errors import InvalidInput

from .conftest import random_image, run_together


# ---- config.pbtxt generation ----------------------------------------------------------------------
def test_configs_follow_the_specs(exported):
    from transformers import AutoConfig

    _, repo, _ = exported("tiny-opt")
    config = AutoConfig.from_pretrained(repository.assets_dir(repo))
    text = (repo / specs.QFORMER / "config.pbtxt").read_text()
    q, e = config.num_query_tokens, config.text_config.hidden_size
    assert f'name: "{specs.QUERY_EMBEDS}"' in text and f"dims: [ {q}, {e} ]" in text
    pipeline = (repo / api.PIPELINE / "config.pbtxt").read_text()
    for control in api.CONTROL_NAMES:
        assert f'name: "{control}"' in pipeline
    assert "${" not in "".join(p.read_text() for p in repo.glob("*/config.pbtxt"))


def test_missing_values_fail_at_generation_time():
    tensor = Tensor("x", "float32", (3,))
    with pytest.raises(ConfigError, match="backend / platform"):
        render(ModelConfig("m", 1, (tensor,), (tensor,), backend=None))
    with pytest.raises(ConfigError, match="'x': dims"):
        render(ModelConfig("m", 1, (Tensor("x", "float32", ()),), (tensor,)))
    with pytest.raises(ConfigError, match="no value"):
        render(ModelConfig("m", 1, (tensor,), (tensor,), parameters={"onnx_file": None}))
    with pytest.raises(ConfigError, match="no Triton type"):
        render(ModelConfig("m", 1, (Tensor("x", "complex64", (1,)),), (tensor,)))


MISSING = [
    ("name", dict(name=None), "missing name"),
    ("empty name", dict(name=""), "missing name"),
    ("max_batch_size", dict(max_batch_size=None), "missing max_batch_size"),
    ("inputs None", dict(inputs=None), "missing inputs"),
    ("inputs empty", dict(inputs=()), "missing inputs"),
    ("outputs empty", dict(outputs=()), "missing outputs"),
    ("queue delay", dict(max_queue_delay_us=None), "missing max_queue_delay_us"),
    ("instance count", dict(instance_count=None), "missing instance_count"),
    ("decoupled", dict(decoupled=None), "missing decoupled"),
    ("dynamic batching", dict(dynamic_batching=None), "missing dynamic_batching"),
    ("parameters", dict(parameters=None), "missing parameters"),
    ("backend and platform", dict(backend=None, platform=None), "backend / platform"),
    ("tensor name", dict(inputs=(Tensor(None, "float32", (3,)),)), "missing name"),
    ("tensor dtype", dict(inputs=(Tensor("x", None, (3,)),)), "'x': no Triton type for dtype None"),
    ("tensor dims", dict(inputs=(Tensor("x", "float32", None),)), "'x': dims"),
    ("a None dim", dict(outputs=(Tensor("y", "float32", (3, None)),)), "'y': dims"),
    ("a zero dim", dict(outputs=(Tensor("y", "float32", (0,)),)), "'y': dims"),
    ("tensor optional", dict(inputs=(Tensor("x", "float32", (3,), optional=None),)), "'x': optional"),
]


@pytest.mark.parametrize("field,overrides,message", MISSING, ids=[m[0] for m in MISSING])
def test_every_missing_value_fails_generation_naming_the_field(field, overrides, message):
    import dataclasses

    tensor = Tensor("x", "float32", (3,))
    good = ModelConfig("m", 1, (tensor,), (tensor,), parameters={"onnx_file": "model.onnx"})
    assert 'string_value: "model.onnx"' in render(good)
    with pytest.raises(ConfigError, match=message):
        render(dataclasses.replace(good, **overrides))


def test_a_spec_with_a_missing_dim_fails_generation_naming_the_tensor():
    from blip2_triton.specs import TensorSpec

    assert Tensor.from_spec(TensorSpec("x", "float32", ("batch", 3, "seq"))).dims == (3, -1)
    with pytest.raises(ConfigError, match="'x': dims"):
        Tensor.from_spec(TensorSpec("x", "float32", ("batch", None)))


def test_onnxruntime_backend_variant(exported):
    from transformers import AutoConfig

    _, repo, _ = exported("tiny-opt")
    config = AutoConfig.from_pretrained(repository.assets_dir(repo))
    configs = {c.name: c for c in repository.model_configs(config, stateless_backend="onnxruntime")}
    assert configs[specs.VISION_ENCODER].platform == "onnxruntime_onnx"
    assert configs[api.PIPELINE].backend == "python" and configs[api.PIPELINE].decoupled


# ---- preprocessing ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preprocessor(exported):
    from blip2_triton.serving.preprocess import Preprocessor

    _, repo, _ = exported("tiny-opt")
    return Preprocessor(repository.assets_dir(repo))


def test_preprocess_equals_the_transformers_processor(preprocessor, exported):
    import io

    from PIL import Image
    from transformers import AutoProcessor

    ckpt, _, _ = exported("tiny-opt")
    processor = AutoProcessor.from_pretrained(ckpt)
    data = random_image(3)
    pixels, ids = preprocessor(data, b"a photo of")
    ref = processor(images=Image.open(io.BytesIO(data)), text="a photo of", return_tensors="np")
    np.testing.assert_array_equal(pixels, ref["pixel_values"][0])
    q = processor.num_query_tokens
    assert ids.tolist() == ref["input_ids"][0, q:].tolist()


def test_preprocess_batch_isolates_bad_items(preprocessor):
    results = preprocessor.batch([(random_image(1), b""), (b"junk", b""), (random_image(2), "é".encode())])
    assert isinstance(results[1], InvalidInput) and "image" in str(results[1])
    assert results[0][0].shape == results[2][0].shape
    assert not np.array_equal(results[0][0], results[2][0])


def test_preprocess_rejects_bad_prompts(preprocessor, pipeline):
    """Undecodable text is refused by preprocessing; a prompt too long for the context by the
    language model's one context check, once tokenized and before any graph runs."""
    with pytest.raises(InvalidInput, match="UTF-8"):
        preprocessor(random_image(1), b"\xff\xfe")
    with pytest.raises(InvalidInput, match=r"prompt: \d+ tokens.*context"):
        pipeline.service.prepare(random_image(1), b"circle " * 1000, {})


# ---- detokenization ---------------------------------------------------------------------------------
def test_pieces_concatenate_even_across_split_characters(preprocessor):
    from blip2_triton.serving.detokenize import Detokenizer

    tok = preprocessor.tokenizer
    detok = Detokenizer(tok)
    assert detok.incremental  # byte-level BPE, no clean-up: text streams token by token
    ids = tok("a red circle é ü and 日本", add_special_tokens=False)["input_ids"]
    pieces = [detok.piece(ids[: i + 1], 1, final=i == len(ids) - 1) for i in range(len(ids))]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) > len(ids) // 2


def test_a_cleaning_tokenizer_still_streams_pieces_that_concatenate(exported):
    """transformers' clean-up rewrites earlier text ("it '" + "s" -> "it's"), so nothing it could
    change may go out early: such a tokenizer sends its text with the final piece."""
    from transformers import AutoTokenizer

    from blip2_triton.serving.detokenize import Detokenizer

    _, repo, _ = exported("tiny-opt")
    tok = AutoTokenizer.from_pretrained(repository.assets_dir(repo), clean_up_tokenization_spaces=True,
                                        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    ids = tok("it 's a red circle , do n't you see ?", add_special_tokens=False)["input_ids"]
    prefixes = [tok.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
    assert any(not b.startswith(a) for a, b in zip(prefixes, prefixes[1:]))  # the case is real
    detok = Detokenizer(tok)
    assert not detok.incremental
    for step in (1, 3):
        pieces = [detok.piece(ids[:end], min(step, end), final=end == len(ids)) for end in range(step, len(ids) + 1, step)]
        if len(ids) % step:
            pieces.append(detok.piece(ids, len(ids) % step, final=True))
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == "it's a red circle, don't you see?"


# ---- the engine: continuous batching ----------------------------------------------------------------
def test_concurrent_sequences_share_decoder_calls_and_keep_their_tokens(pipeline):
    """8 sequences submitted together finish in far fewer decoder calls than 8 alone, token-identical."""
    prompts = ["", "a photo of", "Question: what color is the square? Answer:", "this is"]
    controls = {"max_new_tokens": 12, "min_new_tokens": 12}
    jobs = [(random_image(seed), prompts[seed % 4], controls) for seed in range(8)]
    alone = [pipeline(image, prompt, **c).token_ids for image, prompt, c in jobs]

    together, engine = run_together(pipeline, jobs)
    assert together == alone
    # 8 x 12 tokens; batched, about 12 steps (+ a few while sequences were still joining).
    assert engine.stats.steps < 8 * 11 // 2
    assert engine.stats.tokens == 8 * 12


def test_invalid_controls_fail_before_any_work(pipeline):
    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    for controls, message in [({"max_new_tokens": 0}, "max_new_tokens"), ({"top_p": 2.0, "do_sample": True}, "top_p"),
                              ({"bogus": 1}, "bogus"), ({"max_new_tokens": 10**6}, "max_new_tokens")]:
        with pytest.raises(InvalidInput, match=message):
            pipeline.generator.request(query, ids, controls)
    with pytest.raises(InvalidInput, match="query_embeds"):
        pipeline.generator.request(query[:1], ids, {})


def test_controls_are_checked_before_the_image_is_read(pipeline):
    """A bad control is named even when the image is junk: nothing was decoded or tokenized yet.
    Valid controls with a too-long prompt are still refused, once the prompt is tokenized."""
    for controls, message in [({"max_new_tokens": 0}, "max_new_tokens"), ({"num_beams": 0}, "num_beams"),
                              ({"max_new_tokens": 10**6}, "max_new_tokens")]:
        with pytest.raises(InvalidInput, match=message):
            pipeline.service.prepare(b"junk", b"", controls)
    with pytest.raises(InvalidInput, match="image"):
        pipeline.service.prepare(b"junk", b"", {"max_new_tokens": 5})
    room = pipeline.generator.language_model.max_positions - pipeline.generator.num_query_tokens - 1
    with pytest.raises(InvalidInput, match="max_new_tokens"):  # fits the shortest prompt, not this one
        pipeline.service.prepare(random_image(1), b"a photo of", {"max_new_tokens": room})
    assert pipeline.service.prepare(random_image(1), b"", {"max_new_tokens": room})


def test_a_failing_request_does_not_stop_the_engine(pipeline):
    from blip2_triton.serving.engine import GenerationEngine, GenerationRequest

    engine = GenerationEngine(pipeline.generator.language_model)
    errors = []
    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    bad = GenerationRequest(query_embeds=query[:, :3], prompt_ids=ids, search=None, on_error=errors.append)
    engine._admit(bad)
    assert errors and not engine._active
    good = pipeline.generator.request(query, ids, {"max_new_tokens": 5})
    assert [int(t) for t in engine.generate(good)] == pipeline(random_image(1), "", max_new_tokens=5).token_ids


def test_too_many_beams_is_refused(pipeline):
    from blip2_triton.serving.generator import MAX_BEAMS

    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    with pytest.raises(InvalidInput, match="num_beams must be <="):
        pipeline.generator.request(query, ids, {"num_beams": MAX_BEAMS + 1})


def test_stop_answers_waiting_and_active_requests(pipeline):
    from blip2_triton.serving.engine import GenerationEngine
    from blip2_triton.errors import Cancelled

    engine = GenerationEngine(pipeline.generator.language_model)
    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    errors = []
    active = pipeline.generator.request(query, ids, {"max_new_tokens": 50, "min_new_tokens": 50}, on_error=errors.append)
    waiting = pipeline.generator.request(query, ids, {"max_new_tokens": 5}, on_error=errors.append)
    engine._admit(active)
    engine.submit(waiting)
    engine.stop()
    assert len(errors) == 2 and all(isinstance(e, Cancelled) for e in errors)


def test_cancelling_the_last_sequence_reports_zero_active(pipeline):
    """The active-sequences gauge is what operators (and the server tests) watch to see a slot freed."""
    from blip2_triton.serving.engine import GenerationEngine
    from blip2_triton.errors import Cancelled

    engine = GenerationEngine(pipeline.generator.language_model, cancel_poll_s=0)
    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    cancelled, errors = threading.Event(), []
    request = pipeline.generator.request(query, ids, {"max_new_tokens": 50, "min_new_tokens": 50},
                                         on_error=errors.append, is_cancelled=cancelled.is_set)
    engine._admit(request)
    engine._step()
    assert engine.stats.active == 1
    cancelled.set()
    engine._step()
    assert engine.stats.active == 0 and not engine._active
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)


def test_a_sequence_is_counted_active_before_its_first_token_goes_out(pipeline):
    """A client holding its first token must find its sequence in the gauge: the last CI failure was
    a cancelled stream whose gauge went 0 -> 1 -> 0 because the count was raised after that token."""
    from blip2_triton.serving.engine import GenerationEngine

    engine = GenerationEngine(pipeline.generator.language_model)
    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    seen = []
    for max_new in (1, 5):
        request = pipeline.generator.request(query, ids, {"max_new_tokens": max_new, "min_new_tokens": max_new},
                                             stream=True, on_tokens=lambda i, n, f: seen.append(engine.stats.active))
        engine.generate(request)
        assert engine.stats.active == 0 and not engine._active
    assert seen and all(active == 1 for active in seen)


def test_cancellation_is_polled_at_most_every_cancel_poll_s(pipeline):
    """In Triton each is_cancelled() is a round trip to the server: asked once per interval, not
    once per step, and a cancelled sequence still stops within one interval plus a step."""
    from blip2_triton.serving.engine import GenerationEngine
    from blip2_triton.errors import Cancelled

    engine = GenerationEngine(pipeline.generator.language_model, cancel_poll_s=0.05)
    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    asked, errors = [], []
    request = pipeline.generator.request(query, ids, {"max_new_tokens": 100, "min_new_tokens": 100},
                                         on_error=errors.append, is_cancelled=lambda: asked.append(1) or len(asked) > 3)
    engine._admit(request)
    steps, start = 0, time.monotonic()
    while engine._active:
        engine._step()
        steps += 1
        time.sleep(0.005)  # a tiny-model step is far shorter than a real one
    elapsed = time.monotonic() - start
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)
    assert len(asked) == 4  # at admission, then once per 0.05 s until the answer was yes
    assert steps > len(asked) and elapsed >= 3 * 0.05
