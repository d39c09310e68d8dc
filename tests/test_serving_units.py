"""Serving logic without a server: config generation, preprocessing, detokenization, the engine."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from blip2_triton import api
from blip2_triton import repository, specs
from blip2_triton.api import Reason
from blip2_triton.pbtxt import ConfigError, ModelConfig, ModelTensor, render
from blip2_triton.errors import InvalidInput
from blip2_triton.serving.preprocess import decode_prompt

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
    tensor = ModelTensor("x", "float32", (3,))
    with pytest.raises(ConfigError, match="backend / platform"):
        render(ModelConfig("m", 1, (tensor,), (tensor,), backend=None))
    with pytest.raises(ConfigError, match="'x': dims"):
        render(ModelConfig("m", 1, (ModelTensor("x", "float32", ()),), (tensor,)))
    with pytest.raises(ConfigError, match="no value"):
        render(ModelConfig("m", 1, (tensor,), (tensor,), parameters={"onnx_file": None}))
    with pytest.raises(ConfigError, match="no Triton type"):
        render(ModelConfig("m", 1, (ModelTensor("x", "complex64", (1,)),), (tensor,)))


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
    ("tensor name", dict(inputs=(ModelTensor(None, "float32", (3,)),)), "missing name"),
    ("tensor dtype", dict(inputs=(ModelTensor("x", None, (3,)),)), "'x': no Triton type for dtype None"),
    ("tensor dims", dict(inputs=(ModelTensor("x", "float32", None),)), "'x': dims"),
    ("a None dim", dict(outputs=(ModelTensor("y", "float32", (3, None)),)), "'y': dims"),
    ("a zero dim", dict(outputs=(ModelTensor("y", "float32", (0,)),)), "'y': dims"),
    ("tensor optional", dict(inputs=(ModelTensor("x", "float32", (3,), optional=None),)), "'x': optional"),
]


@pytest.mark.parametrize("field,overrides,message", MISSING, ids=[m[0] for m in MISSING])
def test_every_missing_value_fails_generation_naming_the_field(field, overrides, message):
    import dataclasses

    tensor = ModelTensor("x", "float32", (3,))
    good = ModelConfig("m", 1, (tensor,), (tensor,), parameters={"onnx_file": "model.onnx"})
    assert 'string_value: "model.onnx"' in render(good)
    with pytest.raises(ConfigError, match=message):
        render(dataclasses.replace(good, **overrides))


def test_a_spec_with_a_missing_dim_fails_generation_naming_the_tensor():
    from blip2_triton.specs import TensorSpec

    assert ModelTensor.from_spec(TensorSpec("x", "float32", ("batch", 3, "seq"))).dims == (3, -1)
    with pytest.raises(ConfigError, match="'x': dims"):
        ModelTensor.from_spec(TensorSpec("x", "float32", ("batch", None)))


def test_onnxruntime_backend_variant(exported):
    from transformers import AutoConfig

    _, repo, _ = exported("tiny-opt")
    config = AutoConfig.from_pretrained(repository.assets_dir(repo))
    configs = {c.name: c for c in repository.model_configs(config, stateless_backend="onnxruntime")}
    assert configs[specs.VISION_ENCODER].platform == "onnxruntime_onnx"
    assert configs[api.PIPELINE].backend == "python" and configs[api.PIPELINE].decoupled


def test_the_ensemble_steps_connect_the_models_tensors(exported):
    """Each step maps only tensors its model has, every required input of a step's model is fed,
    and each step's inputs are the ensemble's inputs or an earlier step's outputs."""
    from transformers import AutoConfig

    from blip2_triton.pbtxt import ENSEMBLE, EnsembleStep

    _, repo, _ = exported("tiny-opt")
    configs = {c.name: c for c in repository.model_configs(AutoConfig.from_pretrained(repository.assets_dir(repo)))}
    ensemble = configs[api.ENSEMBLE]
    assert ensemble.platform == ENSEMBLE
    assert ensemble.inputs == api.PUBLIC_INPUTS and ensemble.outputs == api.PUBLIC_OUTPUTS
    available = {t.name for t in ensemble.inputs}
    for step in ensemble.steps:
        model = configs[step.model]
        assert set(step.inputs) <= {t.name for t in model.inputs}, step.model
        assert set(step.outputs) <= {t.name for t in model.outputs}, step.model
        assert {t.name for t in model.inputs if not t.optional} <= set(step.inputs), step.model
        assert set(step.inputs.values()) <= available, step.model
        available |= set(step.outputs.values())
    assert {t.name for t in ensemble.outputs} <= set(ensemble.steps[-1].outputs.values())
    assert ensemble.steps[-1].model == api.PIPELINE  # the generator step shares blip2's process
    text = render(ensemble)
    assert "ensemble_scheduling" in text and "instance_group" not in text


def test_ensemble_configs_that_cannot_be_rendered():
    import dataclasses

    from blip2_triton.pbtxt import EnsembleStep

    tensor = ModelTensor("x", "float32", (3,))
    step = EnsembleStep("m", {"x": "x"}, {"y": "x"})
    good = ModelConfig("e", 1, (tensor,), (tensor,), backend=None, platform="ensemble", steps=(step,))
    assert 'model_name: "m"' in render(good)
    for overrides, message in ((dict(steps=()), "steps go with platform"),
                               (dict(platform=None, backend="python"), "steps go with platform"),
                               (dict(parameters={"k": "v"}), "no dynamic_batching, decoupled, parameters or instances"),
                               (dict(instance_count=2), "no dynamic_batching, decoupled, parameters or instances"),
                               (dict(steps=(EnsembleStep("m", {}, {"y": "x"}),)), "needs a model, inputs and outputs"),
                               (dict(steps=(EnsembleStep("m", {"x": ""}, {"y": "x"}),)), "both must be tensor names")):
        with pytest.raises(ConfigError, match=message):
            render(dataclasses.replace(good, **overrides))


def test_a_stop_is_remembered_for_its_ttl(monkeypatch):
    from blip2_triton.serving import service

    stops = service.Stops()
    clock = [100.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: clock[0])
    stops.add("a")
    assert "a" in stops and "b" not in stops and "" not in stops
    clock[0] += stops.TTL_S + 1
    stops.add("b")  # adding prunes what expired
    assert "a" not in stops and "b" in stops
    with pytest.raises(InvalidInput, match="stop: the request needs the id"):
        stops.add("")


# ---- preprocessing ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preprocessor(exported):
    from blip2_triton.serving.preprocess import Preprocessor

    _, repo, _ = exported("tiny-opt")
    return Preprocessor(repository.assets_dir(repo))


PROMPTS = ["", "a photo of", "Question: what color is the circle? Answer:", "  two  spaces ", "é ü 日本 🙂",
           "</s> and <pad> inside", "circle " * 40, "\n\ttabs\n"]


def _images():
    """Images of every size class and mode the processor converts: larger and smaller than the
    model's input, not square, grey, palette, RGBA, 16-bit."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    return [rgb(40, 52), rgb(300, 200), rgb(7, 400), rgb(224, 224), rgb(30, 30).convert("L"),
            rgb(64, 48).convert("P"), rgb(50, 60).convert("RGBA"),
            Image.fromarray(rng.integers(0, 65535, (33, 21), dtype=np.uint16))]


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-t5", "embedded"])
def test_preprocess_equals_the_transformers_processor(preset, exported):
    """The preprocess model's torch-free tokenizer and image processor give transformers' processor's
    ids and pixel values exactly, on every checkpoint kind the project ships."""
    import io

    from PIL import Image
    from transformers import AutoProcessor

    from blip2_triton.serving.preprocess import Preprocessor
    from blip2_triton.toy.embedded import TRAINED_MODEL

    ckpt = str(TRAINED_MODEL) if preset == "embedded" else exported(preset)[0]
    ours, processor = Preprocessor(ckpt), AutoProcessor.from_pretrained(ckpt)
    for prompt in PROMPTS:
        ref = processor.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        assert ours.prompt_ids(prompt).tolist() == ref, prompt
    for n, image in enumerate(_images()):
        rgb = image.convert("RGB")  # what decode_image hands over
        ref = processor.image_processor(rgb, return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(ours.pixel_values([rgb]), ref, err_msg=f"image {n} ({image.mode})")
    data = random_image(3)  # the whole request path, as in transformers' processor call
    pixels, ids = ours(data, b"a photo of")
    ref = processor(images=Image.open(io.BytesIO(data)), text="a photo of", return_tensors="np")
    np.testing.assert_array_equal(pixels, ref["pixel_values"][0])
    assert ids.tolist() == ref["input_ids"][0, processor.num_query_tokens:].tolist()


def test_preprocess_does_not_import_torch(exported, tmp_path):
    """The preprocess model holds no weights: transformers, and torch with it, stay out of its process."""
    import subprocess
    import sys

    _, repo, _ = exported("tiny-opt")
    image = tmp_path / "image.png"
    image.write_bytes(random_image(1))
    code = ("import sys; from blip2_triton.serving.preprocess import Preprocessor; "
            f"p = Preprocessor({str(repository.assets_dir(repo))!r}); p(open({str(image)!r}, 'rb').read(), b'a photo'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_generation_does_not_import_torch(exported, tmp_path):
    """The `blip2` model's process (tokenizer, configs, decoder, engine) runs without transformers,
    and so without torch: LocalPipeline runs that same service with in-process stages."""
    import subprocess
    import sys

    _, repo, _ = exported("tiny-opt")
    image = tmp_path / "image.png"
    image.write_bytes(random_image(1))
    code = ("import sys; from blip2_triton.serving.pipeline import LocalPipeline; "
            f"p = LocalPipeline({str(repo)!r}); assert p(open({str(image)!r}, 'rb').read(), 'a photo of', "
            "max_new_tokens=3).token_ids; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-t5", "embedded"])
def test_checkpoint_files_read_as_transformers_reads_them(preset, exported):
    """The server's torch-free readers give transformers' config values, resolved generation
    parameters, tokenization, decoding (special tokens skipped or not) and length limit."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from blip2_triton.generation.params import GenerationParams
    from blip2_triton.serving.checkpoint_files import Tokenizer, load_config, load_generation_config
    from blip2_triton.toy.embedded import TRAINED_MODEL

    ckpt = str(TRAINED_MODEL) if preset == "embedded" else str(exported(preset)[0])
    ours, ref = load_config(ckpt), AutoConfig.from_pretrained(ckpt)
    for name in ("num_query_tokens", "image_token_index"):
        assert getattr(ours, name) == getattr(ref, name), name
    for name in ("model_type", "num_decoder_layers", "num_heads", "d_model", "decoder_start_token_id",
                 "max_position_embeddings"):
        assert getattr(ours.text_config, name, None) == getattr(ref.text_config, name, None), name
    assert specs.lm_head_dim(ours) == specs.lm_head_dim(ref)
    for controls in ({}, {"max_new_tokens": 5}, {"num_beams": 3}, {"do_sample": True, "temperature": 0.7, "top_k": 4}):
        assert (GenerationParams.from_generation_config(load_generation_config(ckpt), prompt_length=40, **controls)
                == GenerationParams.from_generation_config(GenerationConfig.from_pretrained(ckpt), prompt_length=40,
                                                           **controls)), controls
    ours, ref = Tokenizer(ckpt), AutoTokenizer.from_pretrained(ckpt)
    assert ours.model_max_length == ref.model_max_length
    for prompt in PROMPTS:
        assert ours(prompt, add_special_tokens=False) == {"input_ids": ref(prompt, add_special_tokens=False)["input_ids"]}
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, len(ref), rng.integers(1, 12)).tolist()
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (ids, skip)


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
def test_pieces_concatenate_even_across_split_characters(exported):
    from blip2_triton.serving.detokenize import Detokenizer

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(repository.assets_dir(exported("tiny-opt")[1]))
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
    from blip2_triton.serving.engine import Engine, Request

    engine = Engine(pipeline.generator.language_model)
    errors = []
    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    bad = Request(query_embeds=query[:, :3], prompt_ids=ids, search=None, on_error=errors.append)
    engine.admit(bad)
    assert errors and not engine.sequences
    good = pipeline.generator.request(query, ids, {"max_new_tokens": 5})
    assert [int(t) for t in engine.generate(good)] == pipeline(random_image(1), "", max_new_tokens=5).token_ids


def test_too_many_beams_is_refused(pipeline):
    from blip2_triton.serving.generator import MAX_BEAMS

    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    with pytest.raises(InvalidInput, match="num_beams must be <="):
        pipeline.generator.request(query, ids, {"num_beams": MAX_BEAMS + 1})


def test_stop_answers_waiting_and_active_requests(pipeline):
    from blip2_triton.serving.engine import Engine
    from blip2_triton.errors import Cancelled

    engine = Engine(pipeline.generator.language_model)
    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    errors = []
    active = pipeline.generator.request(query, ids, {"max_new_tokens": 50, "min_new_tokens": 50}, on_error=errors.append)
    waiting = pipeline.generator.request(query, ids, {"max_new_tokens": 5}, on_error=errors.append)
    engine.admit(active)
    engine.submit(waiting)
    engine.stop()
    assert len(errors) == 2 and all(isinstance(e, Cancelled) for e in errors)


def test_cancelling_the_last_sequence_reports_zero_active(pipeline):
    """The active-sequences gauge is what operators (and the server tests) watch to see a slot freed."""
    from blip2_triton.serving.engine import Engine
    from blip2_triton.errors import Cancelled

    engine = Engine(pipeline.generator.language_model, cancel_poll_s=0)
    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    cancelled, errors = threading.Event(), []
    request = pipeline.generator.request(query, ids, {"max_new_tokens": 50, "min_new_tokens": 50},
                                         on_error=errors.append, is_cancelled=cancelled.is_set)
    engine.admit(request)
    engine.step()
    assert engine.stats.active == 1
    cancelled.set()
    engine.step()
    assert engine.stats.active == 0 and not engine.sequences
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)


def test_a_sequence_is_counted_active_before_its_first_token_goes_out(pipeline):
    """A client holding its first token must find its sequence in the gauge: the last CI failure was
    a cancelled stream whose gauge went 0 -> 1 -> 0 because the count was raised after that token."""
    from blip2_triton.serving.engine import Engine

    engine = Engine(pipeline.generator.language_model)
    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    seen = []
    for max_new in (1, 5):
        request = pipeline.generator.request(query, ids, {"max_new_tokens": max_new, "min_new_tokens": max_new},
                                             stream=True, on_tokens=lambda i, n, f: seen.append(engine.stats.active))
        engine.generate(request)
        assert engine.stats.active == 0 and not engine.sequences
    assert seen and all(active == 1 for active in seen)


def test_cancellation_is_polled_at_most_every_cancel_poll_s(pipeline):
    """In Triton each is_cancelled() is a round trip to the server: asked once per interval, not
    once per step, and a cancelled sequence still stops within one interval plus a step."""
    from blip2_triton.serving.engine import Engine
    from blip2_triton.errors import Cancelled

    engine = Engine(pipeline.generator.language_model, cancel_poll_s=0.05)
    pixels, ids = pipeline.stages.preprocess(random_image(1), b"")
    query = pipeline.stages.query_embeds(pixels)
    asked, errors = [], []
    request = pipeline.generator.request(query, ids, {"max_new_tokens": 100, "min_new_tokens": 100},
                                         on_error=errors.append, is_cancelled=lambda: asked.append(1) or len(asked) > 3)
    engine.admit(request)
    steps, start = 0, time.monotonic()
    while engine.sequences:
        engine.step()
        steps += 1
        time.sleep(0.005)  # a tiny-model step is far shorter than a real one
    elapsed = time.monotonic() - start
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)
    assert len(asked) == 4  # at admission, then once per 0.05 s until the answer was yes
    assert steps > len(asked) and elapsed >= 3 * 0.05


# ---- refusals: every raise site's reason code, and the reason on the wire ---------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no image data: it opens, and fails to load."""
    import struct

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"junk") + _chunk(b"IEND", b"")


def _zero_size_image(pipeline, monkeypatch):
    """No format Pillow reads yields a 0-pixel image; the check behind it is reached with a stand-in."""
    from types import SimpleNamespace

    from PIL import Image

    monkeypatch.setattr(Image, "open", lambda f: SimpleNamespace(size=(0, 3), load=lambda: None))
    pipeline.stages.preprocessor.decode_image(random_image(1))


def _check_context(family: str, prompt_length: int, max_new_tokens: int, **limits):
    """A family's context check on a stand-in that holds only its limits (no graphs loaded)."""
    from types import SimpleNamespace

    from blip2_triton.serving.opt import OPTLanguageModel
    from blip2_triton.serving.t5 import T5LanguageModel

    cls = {"opt": OPTLanguageModel, "t5": T5LanguageModel}[family]
    cls.check_context(SimpleNamespace(**limits), np.ones(prompt_length, np.int64), max_new_tokens)


def _ids(n: int) -> np.ndarray:
    return np.full(n, 7, np.int64)


def _max_beams() -> int:
    from blip2_triton.serving.generator import MAX_BEAMS

    return MAX_BEAMS


def _preprocess_limits():
    from blip2_triton.serving import preprocess

    return preprocess.MAX_IMAGE_BYTES, preprocess.MAX_PROMPT_BYTES


_TEXT_TOKENIZERS: list = []


def _text_tokenizer():
    """The retrieval calls' TextTokenizer over a tiny-itm checkpoint (Q-Former text positions: 24)."""
    if not _TEXT_TOKENIZERS:
        import atexit
        import shutil
        import tempfile
        from pathlib import Path

        from blip2_triton.serving.retrieval import TextTokenizer
        from blip2_triton.toy.presets import build_tiny_checkpoint

        directory = tempfile.mkdtemp(prefix="text-tokenizer-")
        atexit.register(shutil.rmtree, directory, True)
        _TEXT_TOKENIZERS.append(TextTokenizer(build_tiny_checkpoint(Path(directory) / "itm", "tiny-itm")))
    return _TEXT_TOKENIZERS[0]


# (id, call(pipeline, monkeypatch) that raises InvalidInput, its reason, a pattern of its message:
# the message pins the raise site).
REFUSALS = [
    ("image empty", lambda p, mp: p.stages.preprocessor.decode_image(b""), Reason.IMAGE, "empty"),
    ("image over the byte limit",
     lambda p, mp: p.stages.preprocessor.decode_image(b"\0" * (_preprocess_limits()[0] + 1)), Reason.IMAGE,
     "bytes, more than"),
    ("image over the pixel limit", lambda p, mp: p.stages.preprocessor.decode_image(_png_header(8000, 7000)),
     Reason.IMAGE, "8000x7000 pixels"),
    ("image a decompression bomb", lambda p, mp: p.stages.preprocessor.decode_image(_png_header(20000, 20000)),
     Reason.IMAGE, "too many pixels"),
    ("image in no known format", lambda p, mp: p.stages.preprocessor.decode_image(b"junk"), Reason.IMAGE,
     "no format Pillow reads"),
    ("image corrupt", lambda p, mp: p.stages.preprocessor.decode_image(_png_header(4, 4)), Reason.IMAGE,
     r"cannot decode \(OSError"),
    ("image of zero size", _zero_size_image, Reason.IMAGE, "degenerate size 0x3"),
    ("prompt over the byte limit",
     lambda p, mp: decode_prompt(b"a" * (_preprocess_limits()[1] + 1)),
     Reason.CONTEXT_EXCEEDED, "prompt: .* bytes, more than"),
    ("prompt not UTF-8", lambda p, mp: decode_prompt(b"\xff\xfe"), Reason.PROMPT, "UTF-8"),
    ("control unknown", lambda p, mp: p.generator.params({"bogus": 1}, 10), Reason.CONTROL, "unknown generation"),
    ("control out of range", lambda p, mp: p.generator.params({"top_p": 2.0}, 10), Reason.CONTROL, "top_p"),
    ("num_beams over the server's bound",
     lambda p, mp: p.generator.validate(_ids(3), {"num_beams": _max_beams() + 1}), Reason.CONTROL,
     "num_beams must be <= .* on this server"),
    ("prompt_ids not 1-D", lambda p, mp: p.generator.validate(np.ones((1, 3), np.int64), {}), Reason.INPUT,
     "prompt_ids"),
    ("query_embeds of the wrong shape",
     lambda p, mp: p.generator.request(np.zeros((1, 1), np.float32), _ids(3), {}), Reason.INPUT, "query_embeds"),
    ("OPT prompt beyond the context", lambda p, mp: p.generator.validate(_ids(1000), {}), Reason.CONTEXT_EXCEEDED,
     r"prompt: 1000 tokens.*context"),
    ("OPT no room for max_new_tokens", lambda p, mp: p.generator.validate(_ids(3), {"max_new_tokens": 10**4}),
     Reason.CONTEXT_EXCEEDED, "max_new_tokens must be <= .* for this prompt"),
    ("OPT context check, stand-in",
     lambda p, mp: _check_context("opt", 100, 1, num_query_tokens=32, max_positions=128), Reason.CONTEXT_EXCEEDED,
     "prompt: 100 tokens"),
    ("T5 prompt beyond model_max_length", lambda p, mp: _check_context("t5", 513, 1, max_tokens=512),
     Reason.CONTEXT_EXCEEDED, "prompt: 513 tokens"),
    ("T5 max_new_tokens beyond model_max_length", lambda p, mp: _check_context("t5", 3, 513, max_tokens=512),
     Reason.CONTEXT_EXCEEDED, "max_new_tokens must be <= 512"),
    ("end to end: a junk image through the service", lambda p, mp: p.service.prepare(b"junk", b"", {}),
     Reason.IMAGE, "image"),
    ("end to end: a bad control through the service",
     lambda p, mp: p.service.prepare(b"junk", b"", {"max_new_tokens": 0}), Reason.CONTROL, "max_new_tokens"),
    ("retrieval text empty", lambda p, mp: _text_tokenizer()(b"  "), Reason.TEXT, "text: empty"),
    ("retrieval text not UTF-8", lambda p, mp: _text_tokenizer()(b"\xff\xfe"), Reason.TEXT, "text: not valid UTF-8"),
    ("retrieval text over the byte limit", lambda p, mp: _text_tokenizer()(b"a" * (64 * 2**10 + 1)), Reason.TEXT,
     "text: .* bytes, more than"),
    ("retrieval text beyond the Q-Former's positions", lambda p, mp: _text_tokenizer()("red " * 30), Reason.TEXT,
     "text: 32 tokens, more than the 24"),
]


@pytest.mark.parametrize("raises, reason, message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_every_refusal_carries_its_reason(pipeline, monkeypatch, raises, reason, message):
    with pytest.raises(InvalidInput, match=message) as err:
        raises(pipeline, monkeypatch)
    assert err.value.reason is reason


def test_every_reason_is_raised_by_some_tested_site():
    assert {r[2] for r in REFUSALS} == set(Reason)


REFUSAL_TEXTS = ["image: empty", "prompt: 3 tokens; shorten the prompt", "x [control]: invalid argument: y\nz", ""]


@pytest.mark.parametrize("reason", list(Reason), ids=[r.value for r in Reason])
def test_the_refusal_format_round_trips_through_the_parser(reason):
    for text in REFUSAL_TEXTS:
        message = api.refusal_message(reason, text)
        assert message == f"invalid argument [{reason.value}]: {text}"
        for before in ("", "in ensemble 'blip2', ", "[request id: 7] "):  # what Triton may put in front
            assert api.parse_refusal(before + message) == (reason, text)


def test_messages_that_are_no_refusal_or_name_no_known_code():
    assert api.parse_refusal("internal error: RuntimeError: boom") is None
    assert api.parse_refusal("cancelled: cancelled by the client") is None
    assert api.parse_refusal("invalid argument: image: empty") == (None, "image: empty")  # an older server
    assert api.parse_refusal("invalid argument [too_blue]: image: blue") == (None, "image: blue")  # a newer one


class _TritonError:
    INVALID_ARG, CANCELLED, INTERNAL = "INVALID_ARG", "CANCELLED", "INTERNAL"
    UNAVAILABLE, NOT_FOUND = "UNAVAILABLE", "NOT_FOUND"

    def __init__(self, message: str, code: str = "INTERNAL"):
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> str:
        return self._code


@pytest.fixture
def pb_stub(monkeypatch):
    """triton_python_backend_utils as far as triton_io's request reading and error paths use it.
    A request is a dict of arrays; a BLS call to a stage answers `stub.stage_error`."""
    import sys
    from types import ModuleType, SimpleNamespace

    stub = ModuleType("triton_python_backend_utils")
    stub.TritonError = _TritonError
    stub.InferenceResponse = lambda output_tensors=None, error=None: SimpleNamespace(error=error)
    stub.Tensor = lambda name, value: (name, value)
    stub.get_input_tensor_by_name = lambda request, name: (
        SimpleNamespace(as_numpy=lambda: request[name]) if name in request else None)
    stub.stage_error = None
    stub.InferenceRequest = lambda **kw: SimpleNamespace(exec=lambda: SimpleNamespace(
        has_error=lambda: True, error=lambda: stub.stage_error))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    return stub


@pytest.mark.parametrize("reason", list(Reason), ids=[r.value for r in Reason])
def test_triton_io_sends_the_reason_and_reads_it_back_from_a_stage(pb_stub, reason):
    from blip2_triton.serving import triton_io

    error = triton_io.error_response(InvalidInput("prompt: 9 tokens", reason)).error
    assert error.code() == _TritonError.INVALID_ARG
    assert error.message() == api.refusal_message(reason, "prompt: 9 tokens")
    for message in (error.message(), "in ensemble 'blip2', " + error.message()):
        pb_stub.stage_error = _TritonError(message, _TritonError.INVALID_ARG)
        with pytest.raises(InvalidInput) as err:
            triton_io.BlsStages().preprocess(b"png", b"a photo of")
        assert (str(err.value), err.value.reason) == ("prompt: 9 tokens", reason)


# A stage whose process died, in Triton's words and codes, or being brought back by the supervisor.
DOWN_STAGE_ERRORS = [
    ("Stub process 'qformer_0_0' is not healthy.", _TritonError.INTERNAL),
    ("Model qformer - Error when running inference: Failed for execute the inference request. "
     "Model 'qformer' is not ready.", _TritonError.INTERNAL),
    ("Request for unknown model: 'qformer' has no available versions", _TritonError.NOT_FOUND),
    ("the model is being loaded", _TritonError.UNAVAILABLE),
]


@pytest.mark.parametrize("message,code", DOWN_STAGE_ERRORS, ids=["dead", "not ready", "unloaded", "unavailable"])
def test_triton_io_a_down_stage_is_unavailable(pb_stub, message, code):
    from blip2_triton.errors import Unavailable
    from blip2_triton.serving import triton_io

    pb_stub.stage_error = _TritonError(message, code)
    with pytest.raises(Unavailable) as err:
        triton_io.BlsStages().query_embeds(np.zeros((3, 4, 4), np.float32))
    sent = triton_io.error_response(err.value).error
    assert sent.code() == _TritonError.UNAVAILABLE
    assert sent.message() == api.unavailable_message(f"model 'vision_encoder': {message}")
    assert api.is_unavailable(sent.message()) and api.parse_refusal(sent.message()) is None


def test_triton_io_other_errors_and_its_own_input_checks(pb_stub):
    from blip2_triton.errors import Cancelled
    from blip2_triton.serving import triton_io

    cancelled = triton_io.error_response(Cancelled("cancelled by the client")).error
    assert (cancelled.code(), cancelled.message()) == (_TritonError.CANCELLED, "cancelled: cancelled by the client")
    internal = triton_io.error_response(RuntimeError("boom")).error
    assert internal.code() == _TritonError.INTERNAL and api.parse_refusal(internal.message()) is None

    # Triton's own check of a stage's inputs (no code in its message): an input refusal.
    pb_stub.stage_error = _TritonError("unexpected shape for input 'image'", _TritonError.INVALID_ARG)
    with pytest.raises(InvalidInput) as err:
        triton_io.BlsStages().preprocess(b"png", None)
    assert err.value.reason is Reason.INPUT and "unexpected shape" in str(err.value)
    # An internal error that quotes a refusal stays internal.
    pb_stub.stage_error = _TritonError("internal error: ValueError: " + api.refusal_message(Reason.IMAGE, "x"))
    with pytest.raises(RuntimeError, match="model 'preprocess'"):
        triton_io.BlsStages().preprocess(b"png", None)

    one = np.asarray([[b"png"]], dtype=object)
    for call, request in [(lambda r: triton_io.single(r, "image", required=True), {}),
                          (lambda r: triton_io.single(r, "image"), {"image": np.asarray([[b"a", b"b"]], dtype=object)}),
                          (lambda r: triton_io.row(r, "image"), {}),
                          (lambda r: triton_io.row(r, "image"), {"image": np.concatenate([one, one])})]:
        with pytest.raises(InvalidInput, match="image") as err:
            call(request)
        assert err.value.reason is Reason.INPUT
