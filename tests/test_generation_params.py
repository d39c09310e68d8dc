"""GenerationParams: transformers' defaults and precedence, and one typed error per bad control."""
from __future__ import annotations

import pytest

from blip2_triton.generation import GenerationParams, InvalidGenerationParams
from blip2_triton.generation.params import TRANSFORMERS_DEFAULTS
from blip2_triton.errors import InvalidInput
from blip2_triton.api import Reason


def test_defaults_are_transformers_defaults():
    transformers = pytest.importorskip("transformers")
    defaults = transformers.GenerationConfig._get_default_generation_params()
    params = GenerationParams.from_generation_config({})
    for name in TRANSFORMERS_DEFAULTS:
        if name == "max_new_tokens":  # transformers: max_length=20 counted from the prompt when unset
            assert params.max_new_tokens == defaults["max_length"] == 20
        elif name == "min_new_tokens":
            assert params.min_new_tokens == 0
        else:
            assert getattr(params, name) == defaults[name], name
    assert params == GenerationParams()


def test_precedence_overrides_over_config_over_defaults():
    config = {"num_beams": 3, "top_k": 10, "eos_token_id": [50118, 2], "pad_token_id": 1, "max_new_tokens": 30,
              "transformers_version": "4.40.0", "_from_model_config": True, "bos_token_id": 2, "top_p": None}
    params = GenerationParams.from_generation_config(config, num_beams=2, top_p=0.5, length_penalty=None)
    assert (params.num_beams, params.top_k, params.top_p, params.max_new_tokens) == (2, 10, 0.5, 30)
    assert params.length_penalty == 1.0  # None means "not given"
    assert params.eos_token_ids == (50118, 2) and params.effective_pad_token_id == 1


def test_accepts_a_generation_config_object():
    transformers = pytest.importorskip("transformers")
    config = transformers.GenerationConfig(eos_token_id=2, repetition_penalty=1.2, no_repeat_ngram_size=3)
    params = GenerationParams.from_generation_config(config)
    assert (params.repetition_penalty, params.no_repeat_ngram_size, params.eos_token_ids) == (1.2, 3, (2,))
    assert params.effective_pad_token_id == 2  # like transformers: pad falls back to the first EOS


def test_config_max_length_counts_the_prompt():
    params = GenerationParams.from_generation_config({"max_length": 50}, prompt_length=40)
    assert params.max_new_tokens == 10
    assert GenerationParams.from_generation_config({"max_length": 50}, max_new_tokens=7).max_new_tokens == 7
    with pytest.raises(InvalidGenerationParams, match="max_length"):
        GenerationParams.from_generation_config({"max_length": 50})
    with pytest.raises(InvalidGenerationParams, match="max_length"):
        GenerationParams.from_generation_config({"max_length": 50}, prompt_length=50)


@pytest.mark.parametrize(
    "key, value", [("num_return_sequences", 3), ("bad_words_ids", [[5]]), ("typical_p", 0.5), ("min_length", 10)]
)
def test_config_entries_that_would_change_decoding_are_rejected(key, value):
    with pytest.raises(InvalidGenerationParams, match=key):
        GenerationParams.from_generation_config({key: value})
    # at their neutral value (as old checkpoints write every default) they are accepted
    neutral = {"num_return_sequences": 1, "bad_words_ids": None, "typical_p": 1.0, "min_length": 0}[key]
    GenerationParams.from_generation_config({key: neutral})


def test_unknown_names_are_rejected():
    with pytest.raises(InvalidGenerationParams, match="max_tokens") as err:
        GenerationParams.from_generation_config({}, max_tokens=5)
    assert "max_new_tokens" in str(err.value)  # the message lists what is allowed
    with pytest.raises(InvalidGenerationParams, match="frobnicate"):
        GenerationParams.from_generation_config({"frobnicate": 1})


BAD = [
    ("max_new_tokens", dict(max_new_tokens=0), ">= 1"),
    ("max_new_tokens", dict(max_new_tokens=5.0), "integer"),
    ("max_new_tokens", dict(max_new_tokens=True), "integer"),
    ("max_new_tokens", dict(max_new_tokens="5"), "integer"),
    ("min_new_tokens", dict(min_new_tokens=-1), ">= 0"),
    ("min_new_tokens", dict(min_new_tokens=30, max_new_tokens=20), "<= max_new_tokens"),
    ("num_beams", dict(num_beams=0), ">= 1"),
    ("num_beams", dict(num_beams=2.5), "integer"),
    ("do_sample", dict(do_sample=1), "true or false"),
    ("temperature", dict(do_sample=True, temperature=0.0), "> 0"),
    ("temperature", dict(temperature=float("nan")), "finite"),
    ("top_k", dict(top_k=-1), ">= 0"),
    ("top_k", dict(top_k=False), "integer"),
    ("top_p", dict(top_p=0.0), "(0, 1]"),
    ("top_p", dict(top_p=1.5), "(0, 1]"),
    ("repetition_penalty", dict(repetition_penalty=0.0), "> 0"),
    ("repetition_penalty", dict(repetition_penalty="high"), "number"),
    ("no_repeat_ngram_size", dict(no_repeat_ngram_size=-2), ">= 0"),
    ("length_penalty", dict(length_penalty=float("inf")), "finite"),
    ("early_stopping", dict(early_stopping="always"), "never"),
    ("early_stopping", dict(early_stopping=1), "never"),
    ("seed", dict(seed=-1), ">= 0"),
    ("seed", dict(seed=1.5), "integer"),
    ("eos_token_id", dict(eos_token_id=[2, -1]), "non-negative"),
    ("eos_token_id", dict(eos_token_id="2"), "non-negative"),
    ("pad_token_id", dict(pad_token_id=-1), ">= 0"),
    ("num_beams", dict(num_beams=4, do_sample=True), "do_sample"),
]


@pytest.mark.parametrize("name, kwargs, allowed", BAD, ids=[f"{n}={list(k.values())}" for n, k, _ in BAD])
def test_bad_values_name_the_parameter(name, kwargs, allowed):
    for build in (lambda: GenerationParams(**kwargs), lambda: GenerationParams.from_generation_config({}, **kwargs)):
        with pytest.raises(InvalidGenerationParams) as err:
            build()
        assert name in str(err.value) and allowed in str(err.value)
        assert err.value.reason is Reason.CONTROL
    assert isinstance(err.value, InvalidInput) and isinstance(err.value, ValueError)


# transformers validates these only when the mode that reads them builds its logits processor
# (sampling: temperature, top_k, top_p; repetition_penalty and no_repeat_ngram_size when set), so
# with that mode off it accepts them and at most warns. Here they are refused in every mode.
OUT_OF_RANGE_WHEN_UNUSED = [
    ("temperature", dict(temperature=-1.0), "> 0"),
    ("temperature", dict(temperature=0.0), "> 0"),
    ("top_p", dict(top_p=0.0), "(0, 1]"),
    ("top_p", dict(top_p=1.01), "(0, 1]"),
    ("top_k", dict(top_k=-5), ">= 0"),
    ("repetition_penalty", dict(repetition_penalty=-1.0), "> 0"),
    ("no_repeat_ngram_size", dict(no_repeat_ngram_size=-1), ">= 0"),
    ("length_penalty", dict(length_penalty=float("nan")), "finite"),
    ("early_stopping", dict(early_stopping="yes"), "never"),
    ("seed", dict(seed=-3), ">= 0"),
]


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3), dict(do_sample=True)], ids=["greedy", "beam", "sample"])
@pytest.mark.parametrize("name, kwargs, allowed", OUT_OF_RANGE_WHEN_UNUSED,
                         ids=[f"{n}={list(k.values())}" for n, k, _ in OUT_OF_RANGE_WHEN_UNUSED])
def test_out_of_range_values_are_rejected_in_every_mode(mode, name, kwargs, allowed):
    with pytest.raises(InvalidGenerationParams) as err:
        GenerationParams.from_generation_config({}, **mode, **kwargs)
    assert str(err.value).startswith(name) and allowed in str(err.value)
    assert err.value.reason is Reason.CONTROL


def test_in_range_values_that_go_unused_are_accepted():
    greedy = GenerationParams(temperature=0.5, top_k=10, top_p=0.9, length_penalty=2.0, early_stopping=True, seed=4)
    assert (greedy.do_sample, greedy.num_beams, greedy.temperature, greedy.top_k) == (False, 1, 0.5, 10)
    beams = GenerationParams(num_beams=2, temperature=0.7, top_p=0.5)
    assert (beams.temperature, beams.top_p) == (0.7, 0.5)


def test_validate_context():
    params = GenerationParams(max_new_tokens=30)
    params.validate_context(prompt_length=98, max_positions=128)
    with pytest.raises(InvalidGenerationParams, match="max_new_tokens must be <= 29"):
        params.validate_context(prompt_length=99, max_positions=128)
    with pytest.raises(InvalidGenerationParams, match="prompt"):
        params.validate_context(prompt_length=128, max_positions=128)


# The reason of every other raise site (the per-control ones: test_bad_values_name_the_parameter).
REASONS = [
    ("unknown override", lambda: GenerationParams.from_generation_config({}, max_tokens=5), Reason.CONTROL),
    ("unknown config entry", lambda: GenerationParams.from_generation_config({"frobnicate": 1}), Reason.CONTROL),
    ("unsupported config entry", lambda: GenerationParams.from_generation_config({"typical_p": 0.5}), Reason.CONTROL),
    ("config max_length, no prompt length", lambda: GenerationParams.from_generation_config({"max_length": 50}),
     Reason.CONTROL),
    ("config max_length not above the prompt",
     lambda: GenerationParams.from_generation_config({"max_length": 50}, prompt_length=50), Reason.CONTEXT_EXCEEDED),
    ("prompt fills the context", lambda: GenerationParams().validate_context(128, max_positions=128),
     Reason.CONTEXT_EXCEEDED),
    ("no room for max_new_tokens", lambda: GenerationParams(max_new_tokens=30).validate_context(99, max_positions=128),
     Reason.CONTEXT_EXCEEDED),
    ("prompt length not positive", lambda: GenerationParams().validate_context(0, max_positions=128), Reason.INPUT),
]


@pytest.mark.parametrize("raises, reason", [r[1:] for r in REASONS], ids=[r[0] for r in REASONS])
def test_each_rejection_carries_its_reason(raises, reason):
    with pytest.raises(InvalidGenerationParams) as err:
        raises()
    assert err.value.reason is reason


def test_params_are_frozen_and_hashable():
    params = GenerationParams(eos_token_id=[2, 3])
    with pytest.raises(AttributeError):
        params.num_beams = 3
    assert hash(params) == hash(GenerationParams(eos_token_id=(2, 3)))
