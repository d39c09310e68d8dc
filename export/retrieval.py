"""The graphs of a retrieval checkpoint (Blip2ForImageTextRetrieval): what the exporter traces.

Each wrapper reuses the checkpoint's own submodules (vision model, query tokens, text embeddings,
Q-Former, projections, ITM head) and follows Blip2ForImageTextRetrieval.forward line by line; the
validation gate holds the ONNX graphs to these modules, and the served parity tests hold the whole
path to transformers' own forward (ITM and ITC).
"""
from __future__ import annotations

import torch
from torch import nn

from blip2_triton import specs
from blip2_triton.specs import TensorSpec

from .graphs import Axes, GraphExport, random_float, right_padded_mask
from .wrappers import VisionEncoder


def _queries(model, image_embeds: torch.Tensor) -> torch.Tensor:
    """The learned queries, one set per image.

    transformers also passes an all-ones encoder_attention_mask over the image, which masks
    nothing; it is left out here because, traced, transformers expands it to as many rows as the
    Q-Former's whole input (queries + text) while the cross-attention sees the queries only.
    """
    return model.query_tokens.expand(image_embeds.shape[0], -1, -1)


class ImageFeatures(nn.Module):
    """image_embeds [B, P, Dv] -> image_embeds_proj [B, Q, D]: ITC's image side (unit vectors)."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens, self.qformer, self.vision_projection = model.query_tokens, model.qformer, model.vision_projection

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        queries = _queries(self, image_embeds)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds.to(queries.dtype),
                           return_dict=True).last_hidden_state
        out = out.to(self.vision_projection.weight.dtype)
        return nn.functional.normalize(self.vision_projection(out), dim=-1)


class TextFeatures(nn.Module):
    """input_ids, attention_mask [B, S] -> text_embeds_proj [B, D]: ITC's text side (unit vectors)."""

    def __init__(self, model):
        super().__init__()
        self.embeddings, self.qformer, self.text_projection = model.embeddings, model.qformer, model.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.embeddings(input_ids=input_ids)
        out = self.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask,
                           return_dict=True).last_hidden_state
        out = out.to(self.text_projection.weight.dtype)
        return nn.functional.normalize(self.text_projection(out[:, 0, :]), dim=-1)


class ImageTextMatching(nn.Module):
    """image_embeds [B, P, Dv], input_ids, attention_mask [B, S] -> itm_logits [B, 2]."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens, self.embeddings, self.qformer = model.query_tokens, model.embeddings, model.qformer
        self.itm_head = model.itm_head

    def forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        queries = _queries(self, image_embeds)
        # The queries attend to (and are attended by) every text token: one mask over both.
        mask = torch.cat([torch.ones(queries.shape[:-1], dtype=attention_mask.dtype), attention_mask], dim=1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        out = self.qformer(query_embeds=embeds, query_length=queries.shape[1], attention_mask=mask,
                           encoder_hidden_states=image_embeds.to(queries.dtype), return_dict=True).last_hidden_state
        out = out.to(self.itm_head.weight.dtype)
        return self.itm_head(out[:, : queries.shape[1], :]).mean(dim=1)


def _text_input(vocab_size: int):
    """Token ids drawn from the vocabulary (past the special tokens); row 0 right-padded when there
    are several rows, so the gate checks that padding is masked the way transformers masks it."""

    def make(t: TensorSpec, axes: Axes, gen: torch.Generator) -> torch.Tensor:
        shape = t.resolve(**axes)
        if t.name == specs.INPUT_IDS:
            return torch.randint(5, vocab_size, shape, generator=gen)
        if t.name == specs.ATTENTION_MASK:
            return right_padded_mask(shape)
        return random_float(t, axes, gen)

    return make


def retrieval_graphs(model, float_dtype: str = "float32") -> list[GraphExport]:
    """The GraphExports of a loaded Blip2ForImageTextRetrieval, in specs.retrieval_specs order."""
    vision, image_features, text_features, itm = specs.retrieval_specs(model.config, float_dtype)
    images = ({specs.BATCH: 1}, {specs.BATCH: 3})
    texts = ({specs.BATCH: 1, specs.SEQUENCE: 4}, {specs.BATCH: 3, specs.SEQUENCE: 9})
    make_text = _text_input(model.config.qformer_config.vocab_size)
    trace = {specs.BATCH: 2, specs.SEQUENCE: 6}
    return [
        GraphExport(vision, VisionEncoder(model), {specs.BATCH: 2}, images, random_float),
        GraphExport(image_features, ImageFeatures(model), {specs.BATCH: 2}, images, random_float),
        GraphExport(text_features, TextFeatures(model), trace, texts, make_text),
        GraphExport(itm, ImageTextMatching(model), trace, texts, make_text),
    ]
