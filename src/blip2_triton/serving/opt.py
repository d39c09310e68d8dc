"""OPT (decoder-only) behind the LanguageModel protocol: one graph for prefill and decode steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from blip2_triton import repository, specs
from blip2_triton.errors import InvalidInput
from blip2_triton.api import Reason

from .decoder import DecoderGraph
from .kv_cache import KVCache
from .language_model import self_attention_mask


class OPTLanguageModel:
    def __init__(self, repo: Path, config, generation_config, tokenizer, threads=None, compute_lock=None):
        self.decoder = DecoderGraph(repository.graph_path(repo, specs.LLM_DECODER), threads=threads,
                                    compute_lock=compute_lock)
        self.embed_dim = self.decoder.input_shapes[specs.PREFIX_EMBEDS][2]
        self.num_query_tokens = config.num_query_tokens
        self.image_token_id = config.image_token_index
        self.max_positions = config.text_config.max_position_embeddings
        self._position_bytes = self.new_cache(1, 1).position_bytes

    def new_cache(self, slots: int = 1, capacity: int = 64) -> KVCache:
        return self.decoder.new_cache(slots, capacity)

    def prefill(self, query_embeds, prompt_ids, cache: KVCache, slot: int) -> tuple[np.ndarray, int]:
        length = len(query_embeds) + len(prompt_ids)
        cache.reserve(slot + 1, length)
        feeds = {specs.INPUT_IDS: prompt_ids[None, :], specs.PREFIX_EMBEDS: query_embeds[None],
                 specs.ATTENTION_MASK: np.ones((1, length), np.int64)}
        return self.decoder(feeds, cache.rows(slot, slot + 1)), length

    def step(self, tokens, lengths, cache: KVCache) -> np.ndarray:
        rows = len(tokens)
        cache.reserve(rows, int(lengths.max()) + 1)
        feeds = {specs.INPUT_IDS: tokens[:, None], specs.PREFIX_EMBEDS: np.zeros((rows, 0, self.embed_dim)),
                 specs.ATTENTION_MASK: self_attention_mask(lengths + 1)}
        return self.decoder(feeds, cache.rows(0, rows))

    def cache_extent(self, prompt_ids, max_new_tokens: int) -> tuple[int, ...]:
        return (self.num_query_tokens + len(prompt_ids) + max_new_tokens,)

    def cache_bytes(self, rows: int, extent: tuple[int, ...]) -> int:
        return rows * extent[0] * self._position_bytes

    def history(self, prompt_ids) -> np.ndarray:
        # generate() sees the image placeholders and the prompt as its input_ids.
        return np.concatenate([np.full(self.num_query_tokens, self.image_token_id, np.int64), prompt_ids])

    def check_context(self, prompt_ids, max_new_tokens: int) -> None:
        """Query tokens + prompt + new tokens must fit OPT's learned positions."""
        prompt_length = self.num_query_tokens + len(prompt_ids)
        room = self.max_positions - prompt_length
        if room < 1:
            raise InvalidInput(
                f"prompt: {len(prompt_ids)} tokens; with {self.num_query_tokens} image query tokens the language "
                f"model's context of {self.max_positions} positions leaves room for at most "
                f"{self.max_positions - self.num_query_tokens - 1}; shorten the prompt", Reason.CONTEXT_EXCEEDED)
        if max_new_tokens > room:
            raise InvalidInput(
                f"max_new_tokens must be <= {room} for this prompt ({prompt_length} tokens, model context "
                f"{self.max_positions}), got {max_new_tokens}", Reason.CONTEXT_EXCEEDED)
