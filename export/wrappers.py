"""PyTorch modules whose forward is exactly one exported graph's interface (see blip2_triton.specs).

They reuse the checkpoint's own submodules, so the exported computation is transformers' own; only
the plumbing around them (explicit KV tensors, masks, the query-embedding prefix) is written here.
"""
from __future__ import annotations

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


class _ExplicitCache:
    """The part of transformers' Cache API that attention layers call: concatenate past and new K/V.

    Holding the past as plain tensors keeps the cache an explicit graph input/output.
    """

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        past_k, past_v = self.past[layer_idx]
        k = torch.cat([past_k, key_states], dim=2)
        v = torch.cat([past_v, value_states], dim=2)
        self.present.append((k, v))
        return k, v


def opt_position_ids(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """OPT's positions, as transformers derives them: cumulative count of attended tokens minus one.

    attention_mask [B, T] covers past and new tokens; returns [B, new_tokens] for the new ones.
    Masked slots (padding) never advance the count, so left padding, in the prompt or in a cache
    that was padded to share a batch, leaves every real token at its unpadded position.
    """
    positions = torch.cumsum(attention_mask, dim=1) * attention_mask - 1
    return positions[:, attention_mask.shape[1] - new_tokens :]


def causal_additive_mask(attention_mask: torch.Tensor, new_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 0/1 mask -> [B, 1, new_tokens, T] additive mask (0 = attend, dtype min = blocked).

    Blocked entries use the dtype's minimum rather than -inf so that a row with nothing to attend
    to (a left-padding position) gives a finite uniform softmax instead of NaN, which would otherwise
    leak into the cache through the masked slots.
    """
    total = attention_mask.shape[1]
    past = total - new_tokens
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(new_tokens, device=attention_mask.device) + past
    causal = key_pos[None, :] <= query_pos[:, None]  # [S, T]
    allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, blocked)


class OPTDecoderWithCache(nn.Module):
    """OPTForCausalLM as one prefill/decode graph with an explicit KV cache.

    forward(input_ids [B,S], prefix_embeds [B,P,E], attention_mask [B,past+P+S], *past (key, value per
    layer, [B,H,past,Dh])) -> (logits [B,1,V] float32 for the last position, *present per layer).
    """

    def __init__(self, language_model):
        super().__init__()
        self.lm = language_model
        self.decoder = language_model.model.decoder
        self.num_layers = len(self.decoder.layers)

    def forward(self, input_ids, prefix_embeds, attention_mask, *past_flat):
        dec = self.decoder
        token_embeds = dec.embed_tokens(input_ids)
        inputs_embeds = torch.cat([prefix_embeds.to(token_embeds.dtype), token_embeds], dim=1)
        new_tokens = inputs_embeds.shape[1]

        positions = opt_position_ids(attention_mask, new_tokens)
        # OPTLearnedPositionalEmbedding is an nn.Embedding with an offset of 2.
        pos_embeds = nn.Embedding.forward(dec.embed_positions, positions + dec.embed_positions.offset)
        if dec.project_in is not None:
            inputs_embeds = dec.project_in(inputs_embeds)
        hidden = inputs_embeds + pos_embeds.to(inputs_embeds.dtype)

        mask = causal_additive_mask(attention_mask, new_tokens, hidden.dtype)
        cache = _ExplicitCache([(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.num_layers)])
        for layer in dec.layers:
            hidden = layer(hidden, attention_mask=mask, cache=cache, position_ids=positions)
            if isinstance(hidden, tuple):
                hidden = hidden[0]

        hidden = hidden[:, -1:, :]
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        logits = self.lm.lm_head(hidden).float()
        present = [t for kv in cache.present for t in kv]
        return (logits, *present)
