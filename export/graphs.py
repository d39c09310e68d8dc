"""The graphs to trace for each family: a spec, the torch module that computes it, and a way to
draw inputs of any size for tracing and validation (`GraphExport`). Families name their builder
in export/families.py; the image stages are shared by every family (`image_stage_graphs`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from blip2_triton import specs
from blip2_triton.specs import GraphSpec, TensorSpec

from .wrappers import OPTDecoderWithCache, QFormerProjection, VisionEncoder


Axes = dict[str, int]


@dataclass
class GraphExport:
    spec: GraphSpec
    module: torch.nn.Module
    # Axes for tracing, then the shape cases the validation gate checks (they differ from the
    # trace shapes on purpose, so that a dimension frozen by tracing shows up as a mismatch).
    trace_axes: Axes
    validation_axes: tuple[Axes, ...]
    make_input: Callable[[TensorSpec, Axes, torch.Generator], torch.Tensor]
    custom_opsets: dict[str, int] = field(default_factory=dict)  # domains of non-standard ops the module emits

    def __post_init__(self):
        # torch.onnx.export restores the module's training flag afterwards, recursively: a wrapper
        # left in its default training mode would switch the checkpoint's dropout on after export.
        self.module.eval()

    def sample(self, axes: Axes, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {t.name: self.make_input(t, axes, gen) for t in self.spec.inputs}


def random_float(t: TensorSpec, axes: Axes, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(t.resolve(**axes), generator=gen).to(getattr(torch, t.dtype))


def right_padded_mask(shape) -> torch.Tensor:
    """An all-ones attention mask of `shape` [B, T] whose row 0 is right-padded by a third when
    there are several rows and more than 2 positions: gate inputs that check padding is masked."""
    mask = torch.ones(shape, dtype=torch.int64)
    if shape[0] > 1 and shape[1] > 2:
        mask[0, shape[1] - shape[1] // 3 :] = 0
    return mask


def _decoder_input(vocab_size: int):
    def make(t: TensorSpec, axes: Axes, gen: torch.Generator) -> torch.Tensor:
        shape = t.resolve(**axes)
        if t.name == specs.INPUT_IDS:
            return torch.randint(3, vocab_size, shape, generator=gen)
        if t.name == specs.ATTENTION_MASK:
            # At a decode step (one new position) row 0 is shorter than the others, right-padded,
            # the way sequences of different lengths share a step. The cache buffers beyond each
            # row's length hold random values, which must not matter.
            if axes[specs.SEQUENCE] + axes[specs.PREFIX] == 1:
                return right_padded_mask(shape)
            return torch.ones(shape, dtype=torch.int64)
        return random_float(t, axes, gen)

    return make


def decoder_axes(batch: int, seq: int, prefix: int, past: int, spare: int = 3) -> Axes:
    """`past` cached positions (of the longest row), `spare` unused positions at the buffers' end."""
    total = past + prefix + seq
    return {specs.BATCH: batch, specs.SEQUENCE: seq, specs.PREFIX: prefix, specs.TOTAL: total, specs.CACHE: total + spare}


def image_stage_graphs(model, float_dtype: str) -> list[GraphExport]:
    """Vision encoder and Q-Former: the same for every language-model family."""
    vision, qformer = specs.image_stage_specs(model.config, float_dtype)
    vision_axes = ({specs.BATCH: 1}, {specs.BATCH: 3})
    return [
        GraphExport(vision, VisionEncoder(model), {specs.BATCH: 2}, vision_axes, random_float),
        GraphExport(qformer, QFormerProjection(model), {specs.BATCH: 2}, vision_axes, random_float),
    ]


def opt_graphs(model, float_dtype: str) -> list[GraphExport]:
    """The image stages and the KV-cached OPT decoder of one BLIP-2 OPT model."""
    config = model.config
    q = config.num_query_tokens
    return [
        *image_stage_graphs(model, float_dtype),
        GraphExport(
            specs.decoder_spec(config, float_dtype),
            OPTDecoderWithCache(model.language_model),
            trace_axes=decoder_axes(batch=2, seq=3, prefix=q, past=2),
            validation_axes=(
                decoder_axes(batch=1, seq=5, prefix=q, past=0, spare=0),  # prefill, buffer just long enough
                decoder_axes(batch=3, seq=4, prefix=q, past=0),  # prefill, 3 rows (beams)
                decoder_axes(batch=3, seq=1, prefix=0, past=9),  # decode step, rows of different lengths
                decoder_axes(batch=1, seq=2, prefix=0, past=4),  # several new tokens onto a cache (batch 1 only)
            ),
            make_input=_decoder_input(config.text_config.vocab_size),
            custom_opsets={"com.microsoft": 1},  # GroupQueryAttention
        ),
    ]
