"""The language-model protocol: all the generation engine knows about the model it runs.

The engine, the generator service and the detokenizer never ask which family they serve. A family
(`blip2_triton.families`: its name and graph specs) implements `LanguageModel` in one module here
and registers it in `RUNTIMES`; `export/families.py` registers its graph builders under the same
name. To add a family: its specs, its graph builder, and one class with these members.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from blip2_triton.families import family_of


class Cache(Protocol):
    """One set of buffers for every active sequence, one slot per row (the engine keeps them packed
    from slot 0). `length` is the positions a row has cached; the engine tracks it."""

    slots: int
    ceiling: tuple[int, int] | None  # (slots, decoder positions) that growth never passes; None: no bound
    nbytes: int  # bytes its buffers take now

    def reserve(self, slots: int, capacity: int) -> None: ...  # room for `slots` rows of `capacity` positions

    def move(self, source: int, target: int, rows: int, length: int) -> None: ...  # a sequence's rows move down

    def gather(self, start: int, parents: np.ndarray, length: int) -> None: ...  # beam search reorders rows

    def release(self) -> None: ...  # the engine is idle: give the memory back


class LanguageModel(Protocol):
    """A family's language-model graphs, as the engine drives them.

    prefill: one request's query embeddings [Q, E] and prompt ids [S] into cache slot `slot` ->
    (logits [1, vocab] of its first generated token, positions now cached in its row).
    step: every active row's last token [rows] at its own position (`lengths` [rows]: positions
    cached before this step) in one batched call over slots [0:rows) -> logits [rows, vocab];
    each row then has one more position cached.
    history: the ids transformers' generate() holds before the first new token (its input_ids),
    which repetition penalty and n-gram blocking see, and `max_length` counts.
    check_context: InvalidInput (reason CONTEXT_EXCEEDED) when the prompt, or the prompt plus
    max_new_tokens, cannot fit.
    cache_extent: the most positions a row of this request can hold in each part of the cache,
    decoder positions first (OPT: (positions,); T5: (decoder positions, encoder positions)).
    cache_bytes: bytes of a cache holding `rows` rows of `extent` (the engine's budget counts these).
    """

    embed_dim: int  # width of the query embeddings prefill takes

    def new_cache(self) -> Cache: ...

    def prefill(self, query_embeds: np.ndarray, prompt_ids: np.ndarray, cache: Cache, slot: int) -> tuple[np.ndarray, int]: ...

    def step(self, tokens: np.ndarray, lengths: np.ndarray, cache: Cache) -> np.ndarray: ...

    def history(self, prompt_ids: np.ndarray) -> np.ndarray: ...

    def cache_extent(self, prompt_ids: np.ndarray, max_new_tokens: int) -> tuple[int, ...]: ...

    def cache_bytes(self, rows: int, extent: tuple[int, ...]) -> int: ...

    def check_context(self, prompt_ids: np.ndarray, max_new_tokens: int) -> None: ...


def self_attention_mask(lengths: np.ndarray) -> np.ndarray:
    """[rows, T] right-padded mask of rows that hold `lengths` positions (T: the longest)."""
    return (np.arange(int(lengths.max()))[None, :] < lengths[:, None]).astype(np.int64)


# family name -> "module:class" of its LanguageModel, imported on first use (each pulls its own graphs)
RUNTIMES: dict[str, str] = {
    "opt": "blip2_triton.serving.opt:OPTLanguageModel",
    "t5": "blip2_triton.serving.t5:T5LanguageModel",
}


def load_language_model(repo: str | Path, config, generation_config, tokenizer, threads: int | None = None,
                        compute_lock=None) -> LanguageModel:
    """The LanguageModel of an exported repository, from its checkpoint config's family."""
    import importlib

    module, name = RUNTIMES[family_of(config).name].split(":")
    runtime: Callable[..., LanguageModel] = getattr(importlib.import_module(module), name)
    return runtime(Path(repo), config, generation_config, tokenizer, threads=threads, compute_lock=compute_lock)
