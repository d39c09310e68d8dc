"""The registry of language-model families: which graphs a BLIP-2 checkpoint's language model has.

A family is keyed by the checkpoint's `text_config.model_type` and declares its LM graphs' specs;
the image stages (vision encoder, Q-Former) are shared by every family. The other two parts of a
family register under the same name in the layer that owns them: its torch graph builders in
`blip2_triton.export.families`, its serving runtime (`serving.language_model.LanguageModel`) in
`blip2_triton.serving.language_model`. Tests check that the three registries name the same families.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import specs
from .errors import UnsupportedModelError
from .specs import GraphSpec


@dataclass(frozen=True)
class Family:
    name: str  # text_config.model_type
    lm_specs: Callable[[object, str], tuple[GraphSpec, ...]]  # (Blip2Config, float dtype) -> the LM's graphs
    # The tiny presets (blip2_triton.toy.presets) the parity tests export for this family.
    parity_presets: tuple[str, ...]

    def graph_specs(self, config, float_dtype: str = "float32") -> tuple[GraphSpec, ...]:
        """Every graph, in export order: the image stages every family shares, then the LM's."""
        return (*specs.image_stage_specs(config, float_dtype), *self.lm_specs(config, float_dtype))


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


register(Family(
    name="opt",  # decoder-only
    lm_specs=lambda config, float_dtype: (specs.decoder_spec(config, float_dtype),),
    parity_presets=("tiny-opt", "tiny-opt-proj", "tiny-opt-postln"),
))
register(Family(
    name="t5",  # encoder-decoder (Flan-T5, T5 v1.0)
    lm_specs=lambda config, float_dtype: (specs.t5_encoder_spec(config, float_dtype),
                                          specs.t5_decoder_spec(config, float_dtype)),
    parity_presets=("tiny-t5", "tiny-t5-v1", "tiny-t5-deep"),
))


def family_of(config) -> Family:
    """The family of a Blip2Config; UnsupportedModelError if none is registered."""
    model_type = config.text_config.model_type
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"BLIP-2 with a {model_type!r} language model is not supported yet; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


# The architecture (config.json "architectures") of a checkpoint for image-text retrieval: ITC
# projections and the ITM head over the Q-Former, no language model (Salesforce/blip2-itm-vit-g).
RETRIEVAL_ARCHITECTURE = "Blip2ForImageTextRetrieval"


def is_retrieval(config) -> bool:
    """Is this Blip2Config a retrieval checkpoint's (rather than a generation one's)?"""
    return RETRIEVAL_ARCHITECTURE in (getattr(config, "architectures", None) or ())


def graph_specs(config, float_dtype: str = "float32") -> dict[str, GraphSpec]:
    """All graphs of one BLIP-2 checkpoint, by name, in export order: a retrieval checkpoint's, or
    the image stages and its language-model family's."""
    if is_retrieval(config):
        return {s.name: s for s in specs.retrieval_specs(config, float_dtype)}
    return {s.name: s for s in family_of(config).graph_specs(config, float_dtype)}
