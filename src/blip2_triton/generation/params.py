"""Typed, validated decoding controls, named and defaulted as in transformers' `GenerationConfig`.

A request's controls are checked once, here, into a frozen `GenerationParams`; the decoders in
`search.py` trust it. Every rejection is an `InvalidGenerationParams` whose message names the
parameter and what is allowed, so the serving adapter can send it to the client as it is.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

from blip2_triton.errors import InvalidInput
from blip2_triton.api import Reason

EarlyStopping = Union[bool, Literal["never"]]


class InvalidGenerationParams(InvalidInput):
    """A decoding control is missing, of the wrong type, out of range or contradicts another one
    (reason `control`), or the prompt leaves it no room (`context_exceeded`)."""

    reason = Reason.CONTROL


# transformers' `GenerationConfig._get_default_generation_params()` for the controls we implement.
# transformers expresses the default length as `max_length=20` *new* tokens when neither
# `max_length` nor `max_new_tokens` is set, which is `max_new_tokens=20` here.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 20,
    "min_new_tokens": 0,
    "num_beams": 1,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "length_penalty": 1.0,
    "early_stopping": False,
}

# Generation-config entries that change what transformers decodes but that these decoders do not
# implement, each with the values for which it has no effect. A checkpoint (or caller) that sets
# one of them to anything else is rejected rather than silently decoded differently.
_UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "min_length": (0,),
    "num_return_sequences": (1,),
    "typical_p": (1.0,),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "min_p": (),
    "top_h": (),
    "encoder_repetition_penalty": (1.0,),
    "encoder_no_repeat_ngram_size": (0,),
    "bad_words_ids": (),
    "sequence_bias": (),
    "suppress_tokens": (),
    "begin_suppress_tokens": (),
    "forced_eos_token_id": (),
    "exponential_decay_length_penalty": (),
    "renormalize_logits": (False,),
    "remove_invalid_values": (False,),
    "guidance_scale": (1.0,),
    "watermarking_config": (),
    "constraints": (),
    "force_words_ids": (),
    "stop_strings": (),
    "max_time": (),
    "penalty_alpha": (0.0,),
    "dola_layers": (),
    "num_beam_groups": (1,),
    "diversity_penalty": (0.0,),
    "token_healing": (False,),
    "low_memory": (False,),
    "use_mtp": (False,),
    "prompt_lookup_num_tokens": (),
    "assistant_early_exit": (),
}

# Generation-config entries that do not change the decoded tokens (outputs, caching, compilation,
# assisted-decoding tuning without an assistant, metadata). `forced_bos_token_id` only acts when
# the whole input is one token, which never happens for BLIP-2 (32 image tokens come first).
_IGNORED = frozenset(
    {
        "bos_token_id",
        "decoder_start_token_id",
        "forced_bos_token_id",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "continuous_batching_config",
        "prefill_chunk_size",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
        "is_assistant",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "max_matching_ngram_size",
        "assistant_lookbehind",
        "target_lookbehind",
        "assistant_ensemble_weight",
        "speculation_type",
        "transformers_version",
    }
)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int(name: str, value: Any, *, minimum: int, allowed: str) -> int:
    if not _is_int(value):
        raise InvalidGenerationParams(f"{name} must be an integer {allowed}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise InvalidGenerationParams(f"{name} must be {allowed}, got {value}")
    return int(value)


def _float(name: str, value: Any, allowed: str) -> float:
    if not _is_real(value) or not math.isfinite(float(value)):
        raise InvalidGenerationParams(f"{name} must be a finite number {allowed}, got {value!r}")
    return float(value)


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if _is_int(value):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = None
    if items is None or not all(_is_int(item) and item >= 0 for item in items):
        raise InvalidGenerationParams(f"{name} must be a non-negative integer or a list of them, got {value!r}")
    return tuple(int(item) for item in items)


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """Decoding controls of one request, validated on construction.

    Names, meanings and defaults follow transformers' `GenerationConfig`; the decoders reproduce
    `model.generate()` with the same values. `eos_token_id` is stored as a tuple (empty: no EOS,
    decode `max_new_tokens` tokens). `pad_token_id=None` means "use the first EOS id", as
    transformers does; see `effective_pad_token_id`.

    Beam search with sampling (transformers' beam-sample) is not implemented and is rejected.

    Every range is checked whether or not the mode that reads the control is on: transformers
    checks one only when it builds that mode's logits processor and merely warns otherwise, so a
    greedy request with temperature=-1 would decode and a later switch to sampling would fail.
    In-range values that go unused (top_k=10 without sampling, length_penalty without beams) are
    accepted, as transformers accepts them.
    """

    max_new_tokens: int = TRANSFORMERS_DEFAULTS["max_new_tokens"]
    min_new_tokens: int = TRANSFORMERS_DEFAULTS["min_new_tokens"]
    num_beams: int = TRANSFORMERS_DEFAULTS["num_beams"]
    do_sample: bool = TRANSFORMERS_DEFAULTS["do_sample"]
    temperature: float = TRANSFORMERS_DEFAULTS["temperature"]
    top_k: int = TRANSFORMERS_DEFAULTS["top_k"]
    top_p: float = TRANSFORMERS_DEFAULTS["top_p"]
    repetition_penalty: float = TRANSFORMERS_DEFAULTS["repetition_penalty"]
    no_repeat_ngram_size: int = TRANSFORMERS_DEFAULTS["no_repeat_ngram_size"]
    length_penalty: float = TRANSFORMERS_DEFAULTS["length_penalty"]
    early_stopping: EarlyStopping = TRANSFORMERS_DEFAULTS["early_stopping"]
    seed: int | None = None
    eos_token_id: int | Sequence[int] | None = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("max_new_tokens", _int("max_new_tokens", self.max_new_tokens, minimum=1, allowed=">= 1"))
        put("min_new_tokens", _int("min_new_tokens", self.min_new_tokens, minimum=0, allowed=">= 0"))
        if self.min_new_tokens > self.max_new_tokens:
            raise InvalidGenerationParams(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        put("num_beams", _int("num_beams", self.num_beams, minimum=1, allowed=">= 1"))
        if not isinstance(self.do_sample, bool):
            raise InvalidGenerationParams(f"do_sample must be true or false, got {self.do_sample!r}")
        put("temperature", _float("temperature", self.temperature, "> 0"))
        if self.temperature <= 0.0:
            raise InvalidGenerationParams(
                f"temperature must be > 0, got {self.temperature} (checked whether or not do_sample is on); "
                "for deterministic decoding leave temperature unset and set do_sample=false"
            )
        put("top_k", _int("top_k", self.top_k, minimum=0, allowed=">= 0 (0 disables top-k)"))
        put("top_p", _float("top_p", self.top_p, "in (0, 1]"))
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidGenerationParams(f"top_p must be in (0, 1], got {self.top_p}")
        put("repetition_penalty", _float("repetition_penalty", self.repetition_penalty, "> 0"))
        if self.repetition_penalty <= 0.0:
            raise InvalidGenerationParams(
                f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}"
            )
        put(
            "no_repeat_ngram_size",
            _int("no_repeat_ngram_size", self.no_repeat_ngram_size, minimum=0, allowed=">= 0 (0 disables it)"),
        )
        put("length_penalty", _float("length_penalty", self.length_penalty, "(any finite value)"))
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise InvalidGenerationParams(
                f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}"
            )
        if self.seed is not None:
            put("seed", _int("seed", self.seed, minimum=0, allowed=">= 0"))
        put("eos_token_id", _token_ids("eos_token_id", self.eos_token_id))
        if self.pad_token_id is not None:
            put("pad_token_id", _int("pad_token_id", self.pad_token_id, minimum=0, allowed=">= 0"))
        if self.num_beams > 1 and self.do_sample:
            raise InvalidGenerationParams(
                f"num_beams > 1 (got {self.num_beams}) together with do_sample=true (beam-sample) is not supported; "
                "use num_beams=1 to sample or do_sample=false for beam search"
            )

    # ---------------------------------------------------------------- derived values
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The EOS ids as a tuple (possibly empty)."""
        return self.eos_token_id  # normalised to a tuple in __post_init__

    @property
    def effective_pad_token_id(self) -> int | None:
        """The id transformers writes after a finished sequence: pad_token_id, else the first EOS id."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    def validate_context(self, prompt_length: int, max_positions: int) -> None:
        """Reject a request whose prompt plus `max_new_tokens` cannot fit the model's positions.

        `prompt_length` counts every position the decoder's prefill consumes (for BLIP-2 the query
        tokens, BOS and the text prompt); `max_positions` is the LLM's `max_position_embeddings`.
        """
        if not _is_int(prompt_length) or prompt_length < 1:
            raise InvalidGenerationParams(f"prompt length must be a positive integer, got {prompt_length!r}",
                                          Reason.INPUT)
        room = max_positions - prompt_length
        if room < 1:
            raise InvalidGenerationParams(
                f"the prompt is {prompt_length} tokens long but the model holds at most {max_positions} positions; "
                "shorten the prompt", Reason.CONTEXT_EXCEEDED
            )
        if self.max_new_tokens > room:
            raise InvalidGenerationParams(
                f"max_new_tokens must be <= {room} for this prompt ({prompt_length} tokens, model context "
                f"{max_positions}), got {self.max_new_tokens}", Reason.CONTEXT_EXCEEDED
            )

    # ---------------------------------------------------------------- construction
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_generation_config(
        cls, config: Mapping[str, Any] | Any | None = None, *, prompt_length: int | None = None, **overrides: Any
    ) -> "GenerationParams":
        """Resolve a request's controls the way `model.generate(**overrides)` resolves them.

        Priority: `overrides` (e.g. the request's controls; None means "not given") > the
        checkpoint's generation config (`generation_config.json` as a dict, or a transformers
        `GenerationConfig`; None values are unset) > transformers' global defaults.

        Length: `max_new_tokens` wins; a config that sets only `max_length` means prompt plus new
        tokens, as in transformers, so `prompt_length` (all input ids, image tokens included) is
        then needed; with neither, 20 new tokens. Config entries that would change decoding in ways
        not implemented here are rejected, as are unknown override names.
        """
        if config is None:
            raw: dict[str, Any] = {}
        elif isinstance(config, Mapping):
            raw = dict(config)
        elif hasattr(config, "to_dict"):
            raw = dict(config.to_dict())
        else:
            raise TypeError(f"config must be a mapping or a GenerationConfig, got {type(config).__name__}")

        names = set(cls.field_names())
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidGenerationParams(
                f"unknown generation parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
            )

        values: dict[str, Any] = dict(TRANSFORMERS_DEFAULTS)
        max_length = None
        for key, value in raw.items():
            if value is None or key.startswith("_") or key in _IGNORED:
                continue
            if key in names:
                values[key] = value
            elif key == "max_length":
                max_length = value
            elif key in _UNSUPPORTED_UNLESS:
                if value not in _UNSUPPORTED_UNLESS[key]:
                    neutral = " or ".join(repr(v) for v in _UNSUPPORTED_UNLESS[key]) or "null"
                    raise InvalidGenerationParams(
                        f"generation config sets {key}={value!r}, which is not supported here; "
                        f"it must be {neutral}"
                    )
            else:
                raise InvalidGenerationParams(f"generation config has an unknown entry {key}={value!r}")

        given = {key: value for key, value in overrides.items() if value is not None}
        if max_length is not None and "max_new_tokens" not in given and raw.get("max_new_tokens") is None:
            values["max_new_tokens"] = _new_tokens_from_max_length(max_length, prompt_length)
        values.update(given)
        return cls(**values)


def _new_tokens_from_max_length(max_length: Any, prompt_length: int | None) -> int:
    max_length = _int("max_length", max_length, minimum=1, allowed=">= 1")
    if prompt_length is None:
        raise InvalidGenerationParams(
            f"the generation config sets max_length={max_length} (prompt plus new tokens) and no max_new_tokens; "
            "pass max_new_tokens, or the prompt length to resolve it"
        )
    if prompt_length >= max_length:
        raise InvalidGenerationParams(
            f"the prompt is {prompt_length} tokens long but max_length is {max_length}; set max_new_tokens",
            Reason.CONTEXT_EXCEEDED,
        )
    return max_length - prompt_length
