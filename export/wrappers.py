"""PyTorch modules whose forward is exactly one exported graph's interface (see blip2_triton.specs).

They reuse the checkpoint's own submodules, so the exported computation is transformers' own; only
the plumbing around them (explicit KV tensors, masks, the query-embedding prefix) is written here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """pixel_values [B, C, H, W] -> image_embeds [B, patches+1, Dv] (the vision model's last hidden state)."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state


class QFormerProjection(nn.Module):
    """image_embeds [B, patches+1, Dv] -> query_embeds [B, Q, E]: learned queries, Q-Former, language projection.

    Mirrors Blip2ForConditionalGeneration.generate: the Q-Former runs in its own (fp32) dtype and its
    output is cast back to the image-embedding dtype before the projection.

    transformers projects to the LM's hidden_size, then masked_scatters that into token embeddings
    of width E (word_embed_proj_dim). Where they differ (OPT-350m-style project_in/out), it takes the
    first Q*E projected values of the flattened tensor. We reproduce that per image, which equals
    transformers for one image; for a batch, transformers' flat scatter hands row b the values of
    row b/2 (a transformers bug), which we do not copy.
    """

    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.language_projection = model.language_projection
        self.embed_dim = model.language_model.get_input_embeddings().embedding_dim
        if self.embed_dim > self.language_projection.out_features:
            raise ValueError(
                f"language_projection width {self.language_projection.out_features} is smaller than the LM's "
                f"embedding width {self.embed_dim}; transformers cannot run this BLIP-2 config either"
            )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        qformer_dtype = self.query_tokens.dtype
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = self.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds.to(qformer_dtype),
            encoder_attention_mask=mask,
            return_dict=True,
        ).last_hidden_state
        query_output = query_output.to(self.language_projection.weight.dtype)
        projected = self.language_projection(query_output)
        if projected.shape[-1] != self.embed_dim:
            batch, queries = projected.shape[:2]
            projected = projected.reshape(batch, -1)[:, : queries * self.embed_dim]
            projected = projected.reshape(batch, queries, self.embed_dim)
        return projected


class GroupQueryAttention(torch.autograd.Function):
    """onnxruntime's com.microsoft GroupQueryAttention (all heads for keys and values), in PyTorch.

    Exported as that one node, which writes the new keys/values into the cache buffers and attends
    over each row's own length; forward() is the same computation in PyTorch, which the validation
    gate and the parity tests hold the onnxruntime kernel to.

    query/key/value [B, S, H*D]; past_key/value [B, H, M, D]; seqlens_k [B] int32 (row length after
    this call, minus one); total_length int32 scalar (the longest row, T); attention_bias
    [B, H, S, T] or None, added to the scores (T5's relative position bias). -> (output [B, S, H*D],
    present_key, present_value [B, H, M, D]: past with positions seqlens_k+1-S .. seqlens_k written).
    """

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_length, num_heads: int, scale: float,
                attention_bias=None):
        batch, new, _ = query.shape
        head_dim = past_key.shape[-1]

        def heads(x):
            return x.view(batch, new, num_heads, head_dim).transpose(1, 2)

        positions = (seqlens_k.long() + 1 - new)[:, None] + torch.arange(new)  # [B, S]
        index = positions[:, None, :, None].expand(batch, num_heads, new, head_dim)
        present_key = past_key.clone().scatter_(2, index, heads(key))
        present_value = past_value.clone().scatter_(2, index, heads(value))
        scores = torch.matmul(heads(query), present_key.transpose(2, 3)) * scale  # [B, H, S, M]
        if attention_bias is not None:  # [B, H, S, T]; positions past T are masked below anyway
            scores = scores + nn.functional.pad(attention_bias, (0, past_key.shape[2] - attention_bias.shape[-1]))
        visible = torch.arange(past_key.shape[2])[None, None, :] <= positions[:, :, None]  # causal, own row
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        output = torch.matmul(probs, present_value).transpose(1, 2).reshape(batch, new, num_heads * head_dim)
        return output, present_key, present_value

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_length, num_heads, scale,
                 attention_bias=None):
        inputs = [query, key, value, past_key, past_value, seqlens_k, total_length]
        if attention_bias is not None and not attention_bias.node().mustBeNone():
            inputs += [_absent(g)] * 3 + [attention_bias]  # after cos_cache, sin_cache, position_ids
        outputs = g.op("com.microsoft::GroupQueryAttention", *inputs, num_heads_i=num_heads, kv_num_heads_i=num_heads,
                       scale_f=scale, outputs=3)
        # The exporter cannot infer a contrib op's output types: output is like query, present like past.
        for out, like in zip(outputs, (query, past_key, past_value)):
            out.setType(like.type())
        return outputs


def _absent(g):
    """An omitted optional input of an ONNX node (exported as the empty name)."""
    none = g.op("prim::Constant")
    none.setType(torch._C.OptionalType.ofTensor())
    return none


GQA_ATTENTION = "blip2_triton_gqa"


@dataclass
class _CacheBuffers:
    """What one decoder call's attention layers share (through the attention function's
    `kv_buffers`): the buffers, the row lengths, and each layer's written buffers."""

    past: list[torch.Tensor]  # per layer key, value [B, H, M, Dk]
    seqlens_k: torch.Tensor
    total_length: torch.Tensor
    present: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kv_buffers=None, **kwargs):
    """A transformers attention function: [B, H, S, D] states -> [B, S, H, D], via GroupQueryAttention."""
    cache: _CacheBuffers = kv_buffers
    batch, _, new, _ = query.shape
    heads, head_dim = module.num_heads, module.head_dim  # Python ints: attributes of the node
    pad = int(cache.past[0].shape[-1]) - head_dim

    def packed(x):  # [B, H, S, D] -> [B, S, H*Dk], zero-padded to the cache's head width
        x = x.transpose(1, 2)
        return (nn.functional.pad(x, (0, pad)) if pad else x).reshape(batch, new, heads * (head_dim + pad))

    i = module.layer_idx
    output, present_key, present_value = GroupQueryAttention.apply(
        packed(query), packed(key), packed(value), cache.past[2 * i], cache.past[2 * i + 1],
        cache.seqlens_k, cache.total_length, heads, float(1.0 if scaling is None else scaling),
    )
    cache.present[i] = (present_key, present_value)
    output = output.view(batch, new, heads, head_dim + pad)
    return (output[..., :head_dim] if pad else output), None


class OPTDecoderWithCache(nn.Module):
    """OPTForCausalLM as one prefill/decode graph whose KV cache is updated in place (specs.decoder_spec).

    forward(input_ids [B,S], prefix_embeds [B,P,E], attention_mask [B,T] (right-padded), *past (key,
    value per layer, [B,H,M,Dk])) -> (logits [B,1,V] float32 for the last position, *present).
    transformers' own decoder layers run unchanged; only their attention function is swapped for
    GroupQueryAttention (registered with transformers' AttentionInterface for the duration of a call).
    """

    def __init__(self, language_model):
        super().__init__()
        from transformers import AttentionInterface

        AttentionInterface.register(GQA_ATTENTION, _gqa_attention)
        self.lm = language_model
        self.decoder = language_model.model.decoder
        self.num_layers = len(self.decoder.layers)

    def forward(self, input_ids, prefix_embeds, attention_mask, *past_flat):
        dec = self.decoder
        token_embeds = dec.embed_tokens(input_ids)
        inputs_embeds = torch.cat([prefix_embeds.to(token_embeds.dtype), token_embeds], dim=1)
        new_tokens = inputs_embeds.shape[1]

        lengths = attention_mask.sum(dim=1)  # each row's length after this call
        positions = (lengths - new_tokens)[:, None] + torch.arange(new_tokens)
        # OPTLearnedPositionalEmbedding is an nn.Embedding with an offset of 2.
        pos_embeds = nn.Embedding.forward(dec.embed_positions, positions + dec.embed_positions.offset)
        if dec.project_in is not None:
            inputs_embeds = dec.project_in(inputs_embeds)
        hidden = inputs_embeds + pos_embeds.to(inputs_embeds.dtype)

        cache = _CacheBuffers(
            list(past_flat),
            seqlens_k=(lengths - 1).to(torch.int32),
            total_length=torch._shape_as_tensor(attention_mask)[1].to(torch.int32),
        )
        config = self.lm.config
        saved, config._attn_implementation = config._attn_implementation, GQA_ATTENTION
        try:
            for layer in dec.layers:
                hidden = layer(hidden, attention_mask=None, position_ids=positions, kv_buffers=cache)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
        finally:
            config._attn_implementation = saved

        hidden = hidden[:, -1, :]  # [B, E]: the last position
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        logits = _tied_linear(self.lm.lm_head, hidden).float().unsqueeze(1)
        present = [t for i in range(self.num_layers) for t in cache.present[i]]
        return (logits, *present)


def _tied_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) for a 2-D x, exported as one Gemm(transB=1) that reads the weight as stored.

    nn.Linear without a bias exports as MatMul with a transposed, constant-folded copy of the
    weight; OPT's LM head is tied to the token embedding, so the graph would store that
    [vocab, E] matrix twice. addmm with a (zero) bias is Gemm, into which the exporter folds the
    transpose: the Gather of the embedding and the Gemm of the head then share one initializer.
    """
    bias = linear.bias if linear.bias is not None else x.new_zeros(linear.out_features)
    return torch.addmm(bias, x, linear.weight.t())
