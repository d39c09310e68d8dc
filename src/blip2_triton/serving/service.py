"""One BLIP-2 request from encoded image + prompt to streamed text: what the `blip2` model serves.

    stages.preprocess -> stages.query_embeds -> Engine (KV-cached, continuous batching)
    -> incremental detokenization -> emit(Piece)

The stateless stages are pluggable: inside Triton they are BLS calls to the dynamically batched
`preprocess`, `vision_encoder` and `qformer` models (triton_io.BlsStages); in-process they run
the same code and graphs directly (LocalStages). Everything after them lives in this process, so
cancellation reaches the engine directly and a token costs no extra Triton hop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from blip2_triton import repository, specs

from .checkpoint_files import Tokenizer
from .detokenize import Detokenizer
from .engine import EngineStats, Request
from .generator import Generator
from .onnx_graph import OnnxGraph
from .preprocess import Preprocessor

# Only its length matters to validation: the fewest ids a prompt tokenizes to (BOS, or </s>).
SHORTEST_PROMPT = np.zeros(1, np.int64)


class Stages(Protocol):
    def preprocess(self, image: bytes, prompt: bytes | None) -> tuple[np.ndarray, np.ndarray]:
        """Encoded image + prompt -> pixel values [3, H, W] and prompt ids [S]; InvalidInput if bad."""

    def query_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        """Pixel values [3, H, W] -> query embeddings in the LM's space [Q, E]."""


class LocalStages:
    """The stateless stages run in this process: the same code and graphs the Triton models run."""

    def __init__(self, repo: str | Path, threads: int | None = None):
        self.preprocessor = Preprocessor(repository.assets_dir(repo))
        self.vision = OnnxGraph(repository.graph_path(repo, specs.VISION_ENCODER), threads)
        self.qformer = OnnxGraph(repository.graph_path(repo, specs.QFORMER), threads)

    def preprocess(self, image: bytes, prompt: bytes | None) -> tuple[np.ndarray, np.ndarray]:
        return self.preprocessor(image, prompt)

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision(**{specs.PIXEL_VALUES: pixel_values[None]})[specs.IMAGE_EMBEDS]

    def query_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        image_embeds = self.image_embeds(pixel_values)
        return self.qformer(**{specs.IMAGE_EMBEDS: image_embeds})[specs.QUERY_EMBEDS][0]


@dataclass(frozen=True)
class Piece:
    """One response: the text its new tokens add, those token ids, and whether it is the last."""

    text: str
    token_ids: list[int]
    final: bool
    prompt_tokens: int = 0  # what the language model read before its first new token: query tokens + prompt ids


class Blip2Service:
    def __init__(self, repo: str | Path, stages: Stages, tokenizer=None, threads: int | None = None,
                 stats: EngineStats | None = None, compute_lock=None, kv_budget: int | None = None,
                 max_waiting: int | None = None):
        self.stages = stages
        if tokenizer is None:
            tokenizer = Tokenizer(repository.assets_dir(repo))
        self.generator = Generator(repo, tokenizer, threads=threads, stats=stats, compute_lock=compute_lock,
                                   kv_budget=kv_budget, max_waiting=max_waiting)
        self.detokenizer = Detokenizer(tokenizer)

    @property
    def engine(self):
        return self.generator.engine

    def prepare(
        self,
        image: bytes,
        prompt: bytes | None,
        controls: dict[str, Any],
        stream: bool = False,
        emit: Callable[[Piece], None] = lambda piece: None,
        on_error: Callable[[BaseException], None] = lambda e: None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> Request:
        """Run the stateless stages on the calling thread and return the engine request.

        Raises InvalidInput for a bad image, prompt or control. Controls are checked before any
        stage runs, against the shortest prompt (BOS alone): that leaves the most room in the
        context, so a request refused here is refused whatever its prompt. The prompt's own
        length is checked once it is tokenized, still before the vision encoder runs.
        """
        controls = {k: v for k, v in controls.items() if v is not None}
        self.generator.validate(SHORTEST_PROMPT, controls)
        pixels, prompt_ids = self.stages.preprocess(image, prompt)
        params = self.generator.validate(prompt_ids, controls)
        query = self.stages.query_embeds(pixels)
        return self.generator.build(
            query, prompt_ids, params, stream=stream,
            on_tokens=self._pieces(emit, self.generator.num_query_tokens + len(prompt_ids)), on_error=on_error,
            is_cancelled=is_cancelled,
        )

    def _pieces(self, emit: Callable[[Piece], None], prompt_tokens: int) -> Callable[[list[int], int, bool], None]:
        stats = self.engine.stats

        def on_tokens(ids: list[int], new: int, final: bool) -> None:
            began = time.perf_counter()
            text = self.detokenizer.piece(ids, new, final=final)
            stats.on_stage("detokenize", time.perf_counter() - began)
            if final:
                stats.flush()  # this detokenization too is counted before the client has its answer
            emit(Piece(text, ids[len(ids) - new :], final, prompt_tokens))

        return on_tokens
