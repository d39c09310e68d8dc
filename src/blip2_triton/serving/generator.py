"""The generator service: validated requests -> the continuous-batching engine -> token callbacks.

Owns the language model (any family, through serving.language_model) and its cache. Used by the
`blip2` Triton model and, without a server, by `LocalPipeline` (tests, benchmarks), both through
`Blip2Service`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from blip2_triton import generation, repository
from blip2_triton.errors import InvalidInput
from blip2_triton.api import CONTROL_NAMES, Reason

from .checkpoint_files import load_config, load_generation_config
from .engine import EngineStats, Engine, Request
from .language_model import LanguageModel, load_language_model
from .step_gate import StepGate


# Each beam is a row of every decoder call and a copy of the KV cache: a server-side bound keeps one
# request from taking the memory and the batch of all others.
MAX_BEAMS = 16

class Generator:
    def __init__(self, repo: str | Path, tokenizer, threads: int | None = None, max_rows: int = 64,
                 stats: EngineStats | None = None, compute_lock=None, kv_budget: int | None = None,
                 max_waiting: int | None = None):
        assets = repository.assets_dir(repo)
        self.config = load_config(assets)
        self.generation_config = load_generation_config(assets)
        self.language_model: LanguageModel = load_language_model(
            repo, self.config, self.generation_config, tokenizer, threads=threads, compute_lock=compute_lock)
        self.engine = Engine(self.language_model, max_rows=max_rows, stats=stats, gate=StepGate.from_environment(),
                             kv_budget=kv_budget, max_waiting=max_waiting)
        self.num_query_tokens = self.config.num_query_tokens

    def params(self, controls: dict[str, Any], prompt_length: int) -> "generation.GenerationParams":
        """Controls (absent ones = checkpoint defaults) -> validated params, or InvalidInput.

        prompt_length: the length of generate()'s input_ids (LanguageModel.history), which a
        checkpoint's max_length counts.
        """
        unknown = set(controls) - set(CONTROL_NAMES)
        if unknown:
            raise InvalidInput(f"unknown generation controls {sorted(unknown)}; known: {list(CONTROL_NAMES)}",
                               Reason.CONTROL)
        try:
            return generation.GenerationParams.from_generation_config(
                self.generation_config, prompt_length=prompt_length, **controls
            )
        except generation.InvalidGenerationParams as e:
            raise InvalidInput(str(e), e.reason) from None

    def validate(self, prompt_ids: np.ndarray, controls: dict[str, Any]) -> "generation.GenerationParams":
        """Prompt ids + controls -> validated params; raises InvalidInput. Cheap: the pipeline calls it
        before running any graph, so a bad request costs no vision or decoder work."""
        if prompt_ids.ndim != 1 or prompt_ids.size == 0:
            raise InvalidInput(f"prompt_ids: expected a non-empty 1-D array, got shape {list(prompt_ids.shape)}",
                               Reason.INPUT)
        params = self.params(controls, len(self.language_model.history(prompt_ids)))
        if params.num_beams > MAX_BEAMS:
            raise InvalidInput(f"num_beams must be <= {MAX_BEAMS} on this server, got {params.num_beams}",
                               Reason.CONTROL)
        self.language_model.check_context(prompt_ids, params.max_new_tokens)  # the one context check
        self.engine.check_fits(params.num_beams, self.language_model.cache_extent(prompt_ids, params.max_new_tokens))
        return params

    def request(
        self,
        query_embeds: np.ndarray,
        prompt_ids: np.ndarray,
        controls: dict[str, Any],
        stream: bool = False,
        on_tokens: Callable[[list[int], int, bool], None] = lambda ids, new, final: None,
        on_error: Callable[[BaseException], None] = lambda e: None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> Request:
        """Build a validated engine request; raises InvalidInput before any work is done."""
        return self.build(query_embeds, prompt_ids, self.validate(prompt_ids, controls), stream, on_tokens, on_error,
                          is_cancelled)

    def build(
        self,
        query_embeds: np.ndarray,
        prompt_ids: np.ndarray,
        params: "generation.GenerationParams",
        stream: bool = False,
        on_tokens: Callable[[list[int], int, bool], None] = lambda ids, new, final: None,
        on_error: Callable[[BaseException], None] = lambda e: None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> Request:
        """The engine request for params that `validate` returned for these prompt ids."""
        expected = (self.num_query_tokens, self.language_model.embed_dim)
        if query_embeds.shape != expected:
            raise InvalidInput(f"query_embeds: expected shape {list(expected)}, got {list(query_embeds.shape)}",
                               Reason.INPUT)
        search = generation.make_search(params, self.language_model.history(prompt_ids))
        return Request(
            # Beam search cannot stream (the best beam is known only at the end): one response.
            query_embeds=query_embeds, prompt_ids=prompt_ids, search=search, stream=stream and not params.is_beam_search,
            on_tokens=on_tokens, on_error=on_error, is_cancelled=is_cancelled,
            rows=params.num_beams, extent=self.language_model.cache_extent(prompt_ids, params.max_new_tokens),
        )
