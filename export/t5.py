"""The T5 family's graphs (Flan-T5, T5 v1.0): an encoder and a KV-cached decoder (specs.t5_*_spec).

The checkpoint's own submodules compute everything (embeddings, RMS norms, attention projections,
feed-forwards, the relative-position embedding and its bucketing); only the plumbing is written
here: the query-embedding prefix, the cross-attention keys and values computed once in the encoder
graph, and the decoder's self-attention through GroupQueryAttention over the in-place cache.
"""
from __future__ import annotations

import torch
from torch import nn

from blip2_triton import specs

from .graphs import GraphExport, decoder_axes, image_stage_graphs, random_float
from .wrappers import GroupQueryAttention


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]."""
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


class T5EncoderWithCrossKV(nn.Module):
    """prefix_embeds [B, P, E], input_ids [B, S] -> per decoder layer, its cross-attention keys and
    values over the encoder output [B, H, P+S, d_kv] (the prefix precedes the prompt, as
    Blip2ForConditionalGeneration builds inputs_embeds; no padding: one request at a time)."""

    def __init__(self, language_model):
        super().__init__()
        self.lm = language_model
        self.heads = language_model.config.num_heads

    def forward(self, prefix_embeds, input_ids):
        token_embeds = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([prefix_embeds.to(token_embeds.dtype), token_embeds], dim=1)
        encoded = self.lm.encoder(inputs_embeds=embeds, return_dict=True).last_hidden_state
        out = []
        for block in self.lm.decoder.block:
            cross = block.layer[1].EncDecAttention
            out += [_heads(cross.k(encoded), self.heads), _heads(cross.v(encoded), self.heads)]
        return tuple(out)


class T5DecoderWithCache(nn.Module):
    """T5's decoder stack and LM head as one graph whose self-attention cache is updated in place.

    forward(input_ids [B,S], attention_mask [B,T] (right-padded), encoder_attention_mask [B,N],
    *encoded (key, value per layer, [B,H,N,d_kv]), *past (key, value per layer, [B,H,M,Dk]))
    -> (logits [B,1,V] float32 for the last position, *present).
    """

    def __init__(self, language_model):
        super().__init__()
        self.lm = language_model
        config = language_model.config
        self.layers = len(language_model.decoder.block)
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.relative = language_model.decoder.block[0].layer[0].SelfAttention  # holds the bias table
        # transformers 5 names the tied-head rescale scale_decoder_outputs; earlier, tie_word_embeddings.
        self.rescale = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)

    def _position_bias(self, positions, total):
        """[B, H, S, T]: the relative-position bias of each row's new positions over 0..T-1."""
        relative = torch.arange(total)[None, None, :] - positions[:, :, None]  # memory - query
        buckets = self.relative._relative_position_bucket(
            relative, bidirectional=False, num_buckets=self.relative.relative_attention_num_buckets,
            max_distance=self.relative.relative_attention_max_distance)
        return self.relative.relative_attention_bias(buckets).permute(0, 3, 1, 2)

    def _self_attention(self, attention, normed, past_key, past_value, seqlens_k, total_length, bias):
        batch, new, _ = normed.shape
        pad = past_key.shape[-1] - self.head_dim

        def packed(x):  # [B, S, H*D] -> [B, S, H*Dk], each head zero-padded to the cache's width
            if not pad:
                return x
            return nn.functional.pad(x.view(batch, new, self.heads, self.head_dim), (0, pad)).reshape(batch, new, -1)

        output, present_key, present_value = GroupQueryAttention.apply(
            packed(attention.q(normed)), packed(attention.k(normed)), packed(attention.v(normed)),
            past_key, past_value, seqlens_k, total_length, self.heads, 1.0, bias)  # T5 does not scale scores
        if pad:
            output = output.view(batch, new, self.heads, -1)[..., : self.head_dim].reshape(batch, new, -1)
        return attention.o(output), present_key, present_value

    def _cross_attention(self, attention, normed, key, value, mask_bias):
        query = _heads(attention.q(normed), self.heads)
        scores = torch.matmul(query, key.transpose(2, 3)) + mask_bias  # unscaled, as T5
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        output = torch.matmul(probs, value).transpose(1, 2)
        return attention.o(output.reshape(*normed.shape[:2], -1))

    def forward(self, input_ids, attention_mask, encoder_attention_mask, *flat):
        encoded, past = flat[: 2 * self.layers], flat[2 * self.layers :]
        hidden = self.lm.decoder.embed_tokens(input_ids)
        new = input_ids.shape[1]
        lengths = attention_mask.sum(dim=1)  # each row's length after this call
        positions = (lengths - new)[:, None] + torch.arange(new)
        total_length = torch._shape_as_tensor(attention_mask)[1].to(torch.int32)
        bias = self._position_bias(positions, attention_mask.shape[1]).to(hidden.dtype)
        seqlens_k = (lengths - 1).to(torch.int32)
        mask_bias = (1.0 - encoder_attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        present = []
        for i, block in enumerate(self.lm.decoder.block):
            self_layer, cross_layer, feed_forward = block.layer
            out, key, value = self._self_attention(self_layer.SelfAttention, self_layer.layer_norm(hidden),
                                                   past[2 * i], past[2 * i + 1], seqlens_k, total_length, bias)
            hidden = hidden + out
            present += [key, value]
            hidden = hidden + self._cross_attention(cross_layer.EncDecAttention, cross_layer.layer_norm(hidden),
                                                    encoded[2 * i], encoded[2 * i + 1], mask_bias)
            hidden = feed_forward(hidden)
        hidden = self.lm.decoder.final_layer_norm(hidden[:, -1:, :])
        if self.rescale:
            hidden = hidden * (self.lm.config.d_model ** -0.5)
        return (self.lm.lm_head(hidden).float(), *present)


def _t5_input(vocab_size: int):
    def make(t: specs.TensorSpec, axes: dict, gen: torch.Generator) -> torch.Tensor:
        shape = t.resolve(**axes)
        if t.name == specs.INPUT_IDS:
            return torch.randint(2, vocab_size, shape, generator=gen)
        if t.name in (specs.ATTENTION_MASK, specs.ENCODER_ATTENTION_MASK):
            # Row 0 shorter than the others (right padding), as rows of different requests share a step.
            mask = torch.ones(shape, dtype=torch.int64)
            short = t.name == specs.ENCODER_ATTENTION_MASK or axes[specs.SEQUENCE] == 1
            if short and shape[0] > 1 and shape[1] > 2:
                mask[0, shape[1] - shape[1] // 3 :] = 0
            return mask
        return random_float(t, axes, gen)

    return make


def _encoder_axes(batch: int, prefix: int, seq: int) -> dict:
    return {specs.BATCH: batch, specs.PREFIX: prefix, specs.SEQUENCE: seq, specs.ENCODED: prefix + seq}


def t5_graphs(model, float_dtype: str) -> list[GraphExport]:
    """The image stages, the T5 encoder (with cross-attention projections) and the KV-cached decoder."""
    config = model.config
    q, lm = config.num_query_tokens, model.language_model
    make = _t5_input(config.text_config.vocab_size)

    def step_axes(batch, seq, past, encoded, spare=3):
        return {**decoder_axes(batch, seq, 0, past, spare), specs.ENCODED: encoded}

    return [
        *image_stage_graphs(model, float_dtype),
        GraphExport(
            specs.t5_encoder_spec(config, float_dtype), T5EncoderWithCrossKV(lm),
            trace_axes=_encoder_axes(2, q, 3),
            validation_axes=(_encoder_axes(1, q, 1), _encoder_axes(1, q, 7), _encoder_axes(3, q, 4)),
            make_input=make,
        ),
        GraphExport(
            specs.t5_decoder_spec(config, float_dtype), T5DecoderWithCache(lm),
            trace_axes=step_axes(batch=2, seq=1, past=2, encoded=q + 3),
            validation_axes=(
                step_axes(batch=1, seq=1, past=0, encoded=q + 1, spare=0),  # the first step, buffer just long enough
                step_axes(batch=3, seq=1, past=0, encoded=q + 5),  # first step, 3 rows, one with a shorter encoding
                step_axes(batch=3, seq=1, past=9, encoded=q + 6),  # decode step, rows of different lengths
                step_axes(batch=1, seq=3, past=4, encoded=q + 2),  # several new tokens onto a cache (batch 1 only)
            ),
            make_input=make,
            custom_opsets={"com.microsoft": 1},  # GroupQueryAttention
        ),
    ]
