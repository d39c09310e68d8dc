"""The registry of language-model families: which graphs a BLIP-2 checkpoint exports to, and how they are served.

A family is keyed by the checkpoint's `text_config.model_type`. It declares its graphs' specs (the
shared image stages, then its own LM graphs), which Triton model parameter names each LM graph,
and the builder of the torch modules to trace (imported lazily: this module is read by the
config.pbtxt generator and must not pull in torch). OPT (decoder-only) is registered here; Flan-T5
(encoder-decoder) plugs in with `register(Family("t5", ...))`, its encoder and cached-decoder
graphs held by the `blip2` model beside the vision encoder and Q-Former exports, unchanged.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from blip2_triton import specs
from blip2_triton.specs import GraphSpec


class UnsupportedModelError(ValueError):
    """The checkpoint's language model has no export family (yet)."""


@dataclass(frozen=True)
class Family:
    name: str  # text_config.model_type
    lm_specs: Callable[[object, str], tuple[GraphSpec, ...]]  # (Blip2Config, float dtype) -> the LM's graphs
    # Parameter of the `blip2` model's config.pbtxt -> the LM graph whose file it names.
    pipeline_parameters: dict[str, str]
    builder: str  # "module:function": (model, float dtype) -> list[GraphExport], in graph order
    # The tiny preset (blip2_triton.tiny.PRESETS) the parity tests export for this family.
    parity_preset: str

    def graph_specs(self, config, float_dtype: str = "float32") -> tuple[GraphSpec, ...]:
        """Every graph, in export order: the image stages every family shares, then the LM's."""
        return (*specs.image_stage_specs(config, float_dtype), *self.lm_specs(config, float_dtype))

    def graphs(self, model, float_dtype: str = "float32") -> list:
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module, __package__), function)(model, float_dtype)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


register(Family(
    name="opt",
    lm_specs=lambda config, float_dtype: (specs.decoder_spec(config, float_dtype),),
    pipeline_parameters={"onnx_file": specs.LLM_DECODER},
    builder=".graphs:opt_graphs",
    parity_preset="tiny-opt",
))


def family_of(config) -> Family:
    """The family of a Blip2Config; UnsupportedModelError if none is registered."""
    model_type = config.text_config.model_type
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"BLIP-2 with a {model_type!r} language model is not supported yet; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def family_graphs(model, float_dtype: str = "float32") -> list:
    """The GraphExports (spec, torch module, input sampler) of a loaded Blip2ForConditionalGeneration."""
    return family_of(model.config).graphs(model, float_dtype)
