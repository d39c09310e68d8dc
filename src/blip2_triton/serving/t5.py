"""T5 (encoder-decoder: Flan-T5, T5 v1.0) behind the LanguageModel protocol.

Prefill runs the encoder graph once (query embeddings + prompt -> every decoder layer's
cross-attention keys and values, stored in the request's cache slot) and the decoder's first
step on the decoder start token. Steps batch rows of different encoder lengths: each row's
cross-attention is masked to its own encoding.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from blip2_triton import repository, specs
from blip2_triton.errors import InvalidInput
from blip2_triton.api import Reason

from .decoder import DecoderGraph
from .kv_cache import EncoderDecoderCache, KVCache
from .language_model import self_attention_mask
from .onnx_graph import OnnxGraph


class T5LanguageModel:
    def __init__(self, repo: Path, config, generation_config, tokenizer, threads=None, compute_lock=None):
        self.encoder = OnnxGraph(repository.graph_path(repo, specs.LLM_ENCODER), threads, compute_lock=compute_lock)
        self.decoder = DecoderGraph(repository.graph_path(repo, specs.LLM_DECODER), threads=threads,
                                    compute_lock=compute_lock)
        text = config.text_config
        self.embed_dim = text.d_model
        self.num_query_tokens = config.num_query_tokens
        self.layers, self.heads, self.head_dim = text.num_decoder_layers, text.num_heads, specs.lm_head_dim(config)
        start = generation_config.get("decoder_start_token_id")
        self.start_token = text.decoder_start_token_id if start is None else start
        # T5 has no position table; the tokenizer's limit (512 for Flan-T5) bounds prompts and answers.
        self.max_tokens = int(tokenizer.model_max_length)
        cache = self.new_cache(1, 1)
        self._position_bytes = (cache.decoder.position_bytes, cache.encoded.position_bytes)
        self._encoded_names = [n for i in range(self.layers) for n in (specs.encoder_key(i), specs.encoder_value(i))]

    def new_cache(self, slots: int = 1, capacity: int = 64) -> EncoderDecoderCache:
        encoded = KVCache(self.layers, self.heads, self.head_dim, self.decoder.float_dtype, slots, capacity=1)
        return EncoderDecoderCache(self.decoder.new_cache(slots, capacity), encoded)

    def prefill(self, query_embeds, prompt_ids, cache: EncoderDecoderCache, slot: int) -> tuple[np.ndarray, int]:
        outputs = self.encoder(**{specs.PREFIX_EMBEDS: query_embeds[None], specs.INPUT_IDS: prompt_ids[None, :]})
        cache.reserve(slot + 1, 1)
        cache.put_encoded(slot, [outputs[name] for name in self._encoded_names])
        return self._decode(np.array([self.start_token]), np.zeros(1, np.int64), cache, slot), 1

    def step(self, tokens, lengths, cache: EncoderDecoderCache) -> np.ndarray:
        cache.reserve(len(tokens), int(lengths.max()) + 1)
        return self._decode(tokens, lengths, cache, 0)

    def _decode(self, tokens, lengths, cache: EncoderDecoderCache, start: int) -> np.ndarray:
        rows = len(tokens)
        encoded, encoder_mask = cache.encoded_rows(start, start + rows)
        feeds = {specs.INPUT_IDS: tokens[:, None], specs.ATTENTION_MASK: self_attention_mask(lengths + 1),
                 specs.ENCODER_ATTENTION_MASK: encoder_mask}
        return self.decoder(feeds, cache.rows(start, start + rows), dict(zip(self._encoded_names, encoded)))

    def cache_extent(self, prompt_ids, max_new_tokens: int) -> tuple[int, ...]:
        # (decoder positions: the start token and the new tokens; encoder positions: queries + prompt)
        return (1 + max_new_tokens, self.num_query_tokens + len(prompt_ids))

    def cache_bytes(self, rows: int, extent: tuple[int, ...]) -> int:
        return rows * (extent[0] * self._position_bytes[0] + extent[1] * self._position_bytes[1])

    def history(self, prompt_ids) -> np.ndarray:
        # An encoder-decoder generate() starts its input_ids at the decoder start token; the prompt
        # went to the encoder, and penalties do not see it.
        return np.array([self.start_token], np.int64)

    def check_context(self, prompt_ids, max_new_tokens: int) -> None:
        if len(prompt_ids) > self.max_tokens:
            raise InvalidInput(
                f"prompt: {len(prompt_ids)} tokens, more than the {self.max_tokens} this model's tokenizer allows "
                f"(model_max_length); shorten the prompt", Reason.CONTEXT_EXCEEDED)
        if max_new_tokens > self.max_tokens:
            raise InvalidInput(
                f"max_new_tokens must be <= {self.max_tokens} for this model (its tokenizer's model_max_length), "
                f"got {max_new_tokens}", Reason.CONTEXT_EXCEEDED)
