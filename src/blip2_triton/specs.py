"""The interface of every exported graph, declared once.

The exporter (input/output names, dynamic axes), the validation gate, the config.pbtxt generator,
the serving code and the tests all read these specs; a tensor name is spelled here and nowhere else.
Dimensions are either an int read from the checkpoint config or a symbolic name (a dynamic axis).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

Dim = Union[int, str]

# Symbolic axis names, shared by all graphs.
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PREFIX = "prefix_length"
TOTAL = "total_sequence_length"
CACHE = "max_sequence_length"  # positions a KV-cache buffer holds (>= TOTAL)
ENCODED = "encoder_sequence_length"  # positions an encoder-decoder LM's encoder produced

# Graph names; they are also the ONNX file stems and the Triton model names.
VISION_ENCODER = "vision_encoder"
QFORMER = "qformer"
LLM_DECODER = "llm_decoder"  # every family's decoder: prefill and decode steps over the in-place KV cache
LLM_ENCODER = "llm_encoder"  # an encoder-decoder family's encoder (query embeddings + prompt, once per request)
# A retrieval checkpoint's (Blip2ForImageTextRetrieval) graphs. Its vision encoder is
# vision_encoder_spec's graph under another name, so that one repository can serve a generation
# and a retrieval checkpoint side by side (repository.py).
RETRIEVAL_VISION_ENCODER = "retrieval_vision_encoder"
IMAGE_FEATURES = "image_features"  # learned queries + Q-Former + vision_projection + L2 normalization
TEXT_FEATURES = "text_features"  # the Q-Former's text encoder, [CLS] + text_projection + L2 normalization
ITM = "itm"  # the Q-Former over queries and text, cross-attending to the image, + the ITM head


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", ...
    dims: tuple[Dim, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    def resolve(self, **axes: int) -> tuple[int, ...]:
        """Concrete shape with the symbolic axes given as keyword arguments."""
        missing = [d for d in self.dims if isinstance(d, str) and d not in axes]
        if missing:
            raise KeyError(f"{self.name}: no size given for axes {missing}")
        return tuple(axes[d] if isinstance(d, str) else d for d in self.dims)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


# ---- vision encoder: pixel values -> image embeddings -------------------------------------------
PIXEL_VALUES = "pixel_values"
IMAGE_EMBEDS = "image_embeds"

# ---- Q-Former (+ learned query tokens + language projection) -> LLM-space query embeddings -------
QUERY_EMBEDS = "query_embeds"

# ---- LLM decoder with KV cache ------------------------------------------------------------------
INPUT_IDS = "input_ids"
PREFIX_EMBEDS = "prefix_embeds"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"


def encoder_key(i: int) -> str:
    """Decoder layer i's cross-attention keys over the encoder output (computed once per request)."""
    return f"encoder_key_values.{i}.key"


def encoder_value(i: int) -> str:
    return f"encoder_key_values.{i}.value"


ENCODER_ATTENTION_MASK = "encoder_attention_mask"


def vision_encoder_spec(config, float_dtype: str = "float32") -> GraphSpec:
    """`config` is a Blip2Config. pixel_values [B, 3, H, W] (BLIP-2 patch embedding is RGB-only) -> image_embeds [B, patches+1, D]."""
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2 + 1
    return GraphSpec(
        VISION_ENCODER,
        inputs=(TensorSpec(PIXEL_VALUES, float_dtype, (BATCH, 3, v.image_size, v.image_size)),),
        outputs=(TensorSpec(IMAGE_EMBEDS, float_dtype, (BATCH, patches, v.hidden_size)),),
    )


def qformer_spec(config, float_dtype: str = "float32") -> GraphSpec:
    """image_embeds [B, patches+1, Dv] -> query_embeds [B, num_query_tokens, D_lm_embed]."""
    vision = vision_encoder_spec(config, float_dtype).output(IMAGE_EMBEDS)
    return GraphSpec(
        QFORMER,
        inputs=(vision,),
        outputs=(TensorSpec(QUERY_EMBEDS, float_dtype, (BATCH, config.num_query_tokens, lm_embed_dim(config))),),
    )


def lm_embed_dim(config) -> int:
    """Width of the LM's token embeddings (OPT's word_embed_proj_dim, else hidden_size)."""
    t = config.text_config
    return getattr(t, "word_embed_proj_dim", None) or t.hidden_size


def lm_head_dim(config) -> int:
    """Width of one attention head of the LM (T5's d_kv, else hidden_size / heads)."""
    t = config.text_config
    return getattr(t, "d_kv", None) or t.hidden_size // t.num_attention_heads


def kv_head_dim(config) -> int:
    """Head width in the self-attention KV cache: the LM's, rounded up to a multiple of 8.

    onnxruntime's GroupQueryAttention needs a multiple of 8. Real OPT and T5 heads are 64, 80 or
    128 wide; a narrower or odd one is zero-padded, which leaves every attention score and output
    unchanged.
    """
    return -(-lm_head_dim(config) // 8) * 8


def _kv_tensors(layers: int, heads: int, head_dim: int, float_dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The past inputs and present outputs of a self-attention cache updated in place."""
    past, present = [], []
    for i in range(layers):
        past += [TensorSpec(n, float_dtype, (BATCH, heads, CACHE, head_dim)) for n in (past_key(i), past_value(i))]
        present += [TensorSpec(n, float_dtype, (BATCH, heads, CACHE, head_dim)) for n in (present_key(i), present_value(i))]
    return past, present


def decoder_spec(config, float_dtype: str = "float32") -> GraphSpec:
    """One graph for prefill and decode steps of a decoder-only LM (OPT), with a KV cache updated in place.

    Inputs: input_ids [B, S]; prefix_embeds [B, P, E] (the query embeddings at prefill, P=0 at
    decode steps; they precede the tokens); attention_mask [B, T]: row b is 1 on its first n_b
    positions, n_b = its length after this call (cached + P + S), and 0 after (right padding), so
    rows of different lengths share a call; past_key_values.{i}.key/.value [B, heads, M, Dk]:
    buffers holding each row's cached positions 0..n_b-P-S-1, M >= T (Dk: kv_head_dim).
    Outputs: logits [B, 1, vocab] for the last position only (all that generation reads);
    present.{i}.key/.value [B, heads, M, Dk]: the buffers with the new positions written. Bound to
    the same memory as the inputs (onnxruntime IO binding), the update happens in place: a decode
    step writes one position per row instead of copying the whole cache.
    Rows of a call with S + P > 1 (prefill) must all have that many new positions (no padding).
    """
    t = config.text_config
    past, present = _kv_tensors(t.num_hidden_layers, t.num_attention_heads, kv_head_dim(config), float_dtype)
    inputs = [
        TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)),
        TensorSpec(PREFIX_EMBEDS, float_dtype, (BATCH, PREFIX, lm_embed_dim(config))),
        TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL)),
        *past,
    ]
    outputs = [TensorSpec(LOGITS, "float32", (BATCH, 1, t.vocab_size)), *present]
    return GraphSpec(LLM_DECODER, tuple(inputs), tuple(outputs))


def t5_encoder_spec(config, float_dtype: str = "float32") -> GraphSpec:
    """An encoder-decoder LM's encoder (T5), ending in every decoder layer's cross-attention projections.

    Inputs: prefix_embeds [B, P, E] (the query embeddings, which precede the prompt as transformers'
    inputs_embeds do); input_ids [B, S] (the prompt, ending in </s>). No attention mask: the
    engine encodes one request at a time, unpadded.
    Outputs: encoder_key_values.{i}.key/.value [B, heads, P+S, d_kv] for each decoder layer i: what
    its cross-attention reads at every step, computed once per request.
    """
    t = config.text_config
    heads, head_dim = t.num_heads, lm_head_dim(config)
    inputs = (
        TensorSpec(PREFIX_EMBEDS, float_dtype, (BATCH, PREFIX, t.d_model)),
        TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)),
    )
    outputs = tuple(TensorSpec(name, float_dtype, (BATCH, heads, ENCODED, head_dim))
                    for i in range(t.num_decoder_layers) for name in (encoder_key(i), encoder_value(i)))
    return GraphSpec(LLM_ENCODER, inputs, outputs)


def t5_decoder_spec(config, float_dtype: str = "float32") -> GraphSpec:
    """An encoder-decoder LM's decoder (T5): decode steps over an in-place self-attention cache.

    Inputs: input_ids [B, S]; attention_mask [B, T] (decoder positions, right-padded per row, as in
    decoder_spec); encoder_attention_mask [B, N]: 1 on each row's encoder positions;
    encoder_key_values.{i}.key/.value [B, heads, N, d_kv] (llm_encoder's outputs, rows padded to a
    common N); past_key_values.{i}.key/.value [B, heads, M, Dk] (Dk: kv_head_dim).
    Outputs: logits [B, 1, vocab] for the last position; present.{i}.key/.value, bound to the past
    buffers' memory as in decoder_spec.
    """
    t = config.text_config
    layers, heads = t.num_decoder_layers, t.num_heads
    past, present = _kv_tensors(layers, heads, kv_head_dim(config), float_dtype)
    encoded = [TensorSpec(name, float_dtype, (BATCH, heads, ENCODED, lm_head_dim(config)))
               for i in range(layers) for name in (encoder_key(i), encoder_value(i))]
    inputs = (
        TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)),
        TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL)),
        TensorSpec(ENCODER_ATTENTION_MASK, "int64", (BATCH, ENCODED)),
        *encoded,
        *past,
    )
    return GraphSpec(LLM_DECODER, inputs, (TensorSpec(LOGITS, "float32", (BATCH, 1, t.vocab_size)), *present))


# ---- retrieval: ITC features and the ITM head -----------------------------------------------------
IMAGE_EMBEDS_PROJ = "image_embeds_proj"  # normalized projected query embeddings [B, Q, D]
TEXT_EMBEDS_PROJ = "text_embeds_proj"  # normalized projected [CLS] embedding [B, D]
ITM_LOGITS = "itm_logits"  # [B, 2]: (no match, match), the mean over the query positions


def image_features_spec(config, float_dtype: str = "float32") -> GraphSpec:
    """image_embeds [B, patches+1, Dv] -> image_embeds_proj [B, Q, D] (D: image_text_hidden_size),
    each query's vector of unit length, as Blip2VisionModelWithProjection gives it."""
    vision = vision_encoder_spec(config, float_dtype).output(IMAGE_EMBEDS)
    out = TensorSpec(IMAGE_EMBEDS_PROJ, float_dtype, (BATCH, config.num_query_tokens, config.image_text_hidden_size))
    return GraphSpec(IMAGE_FEATURES, inputs=(vision,), outputs=(out,))


def _text_inputs() -> tuple[TensorSpec, TensorSpec]:
    """The Q-Former tokenizer's ids ([CLS] text [SEP], no image tokens) and their mask: 1 on each
    row's tokens, 0 on the right padding of shorter rows."""
    return TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)), TensorSpec(ATTENTION_MASK, "int64", (BATCH, SEQUENCE))


def text_features_spec(config, float_dtype: str = "float32") -> GraphSpec:
    """input_ids, attention_mask [B, S] -> text_embeds_proj [B, D] of unit length: the Q-Former's text
    encoder without the image, its [CLS] output projected, as Blip2TextModelWithProjection. The
    output's dtype is the graph's float dtype (its only float tensor)."""
    out = TensorSpec(TEXT_EMBEDS_PROJ, float_dtype, (BATCH, config.image_text_hidden_size))
    return GraphSpec(TEXT_FEATURES, inputs=_text_inputs(), outputs=(out,))


def itm_spec(config, float_dtype: str = "float32") -> GraphSpec:
    """image_embeds [B, patches+1, Dv], input_ids, attention_mask [B, S] -> itm_logits [B, 2]:
    the Q-Former over the queries and the text together, the queries cross-attending to the image,
    then the ITM head on each query's output, averaged over the queries."""
    vision = vision_encoder_spec(config, float_dtype).output(IMAGE_EMBEDS)
    return GraphSpec(ITM, inputs=(vision, *_text_inputs()), outputs=(TensorSpec(ITM_LOGITS, float_dtype, (BATCH, 2)),))


def retrieval_specs(config, float_dtype: str = "float32") -> tuple[GraphSpec, ...]:
    """Every graph of a retrieval checkpoint, in export order."""
    vision = vision_encoder_spec(config, float_dtype)
    return (
        GraphSpec(RETRIEVAL_VISION_ENCODER, vision.inputs, vision.outputs),
        image_features_spec(config, float_dtype),
        text_features_spec(config, float_dtype),
        itm_spec(config, float_dtype),
    )


def cache_layers(spec: GraphSpec) -> int:
    """Layers of the self-attention cache a decoder graph takes."""
    return sum(1 for t in spec.inputs if t.name.startswith("past_key_values.") and t.name.endswith(".key"))


def image_stage_specs(config, float_dtype: str = "float32") -> tuple[GraphSpec, GraphSpec]:
    """The vision encoder and Q-Former: the image stages every language-model family shares."""
    return (
        vision_encoder_spec(config, float_dtype),
        qformer_spec(config, float_dtype),  # computes in fp32 inside, like transformers
    )
