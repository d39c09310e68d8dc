"""One BLIP-2 request from encoded image + prompt to streamed text: what the `blip2` model serves.

    stages.preprocess -> stages.query_embeds -> Engine (KV-cached, continuous batching)
    -> incremental detokenization -> emit(Piece)

The stateless stages are pluggable: inside Triton they are BLS calls to the dynamically batched
`preprocess`, `vision_encoder` and `qformer` models (triton_io.BlsStages); in-process they run
the same code and graphs directly (LocalStages). Everything after them lives in this process, so
cancellation reaches the engine directly and a token costs no extra Triton hop. With an
ImageCache, an image whose query embeddings are cached skips the stages: its prompt is tokenized
here and the request goes straight to the engine.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from blip2_triton import repository, specs
from blip2_triton.api import Reason
from blip2_triton.errors import InvalidInput

from .checkpoint_files import Tokenizer
from .detokenize import Detokenizer
from .engine import EngineStats, Request
from .generator import Generator
from .image_cache import ImageCache, image_key
from .onnx_graph import OnnxGraph
from .preprocess import Preprocessor, encode_prompt, load_tokenizer

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


def preprocessing_settings(repo: str | Path) -> bytes:
    """What an image's pixels depend on besides its bytes: the checkpoint's image-processor settings."""
    from .image_processing import ImageProcessor

    return repr(ImageProcessor.from_pretrained(repository.assets_dir(repo))).encode()


class Stops:
    """Request ids whose generation a client asked to stop (api.STOP). An id is kept for TTL_S:
    a stop may arrive before the request it names reaches the engine (still in the image steps)."""

    TTL_S = 60.0

    def __init__(self):
        self._ids: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, request_id: str) -> None:
        if not request_id:
            raise InvalidInput("stop: the request needs the id of the request to stop", Reason.INPUT)
        now = time.monotonic()
        with self._lock:
            self._ids = {k: t for k, t in self._ids.items() if now - t < self.TTL_S}
            self._ids[request_id] = now

    def __contains__(self, request_id: str) -> bool:
        return bool(request_id) and request_id in self._ids


class Blip2Service:
    def __init__(self, repo: str | Path, stages: Stages, tokenizer=None, threads: int | None = None,
                 stats: EngineStats | None = None, compute_lock=None, kv_budget: int | None = None,
                 max_waiting: int | None = None, image_cache: ImageCache | None = None):
        self.stages = stages
        if tokenizer is None:
            tokenizer = Tokenizer(repository.assets_dir(repo))
        self.generator = Generator(repo, tokenizer, threads=threads, stats=stats, compute_lock=compute_lock,
                                   kv_budget=kv_budget, max_waiting=max_waiting)
        self.detokenizer = Detokenizer(tokenizer)
        self.image_cache = image_cache
        self.stops = Stops()
        self._settings = preprocessing_settings(repo) if image_cache is not None else b""
        # the cached path tokenizes here exactly as the `preprocess` model does
        self._prompt_tokenizer = load_tokenizer(repository.assets_dir(repo)) if image_cache is not None else None

    @property
    def engine(self):
        return self.generator.engine

    def prepare(
        self,
        image: bytes | None = None,
        prompt: bytes | None = None,
        controls: dict[str, Any] | None = None,
        stream: bool = False,
        emit: Callable[[Piece], None] = lambda piece: None,
        on_error: Callable[[BaseException], None] = lambda e: None,
        is_cancelled: Callable[[], bool] = lambda: False,
        query_embeds: np.ndarray | None = None,
        prompt_ids: np.ndarray | None = None,
        request_id: str = "",
    ) -> Request:
        """Run the stateless stages on the calling thread and return the engine request.

        Raises InvalidInput for a bad image, prompt or control. Controls are checked before any
        stage runs, against the shortest prompt (BOS alone): that leaves the most room in the
        context, so a request refused here is refused whatever its prompt. The prompt's own
        length is checked once it is tokenized, still before the vision encoder runs.

        query_embeds [Q, E] and prompt_ids [S] instead of image and prompt: the stages already ran
        (the ensemble's steps); only the controls and the context are checked. request_id: the
        id a stop (`stop`) names; the request counts as cancelled once it is stopped.
        """
        if request_id:
            cancelled = is_cancelled
            is_cancelled = lambda: request_id in self.stops or cancelled()  # noqa: E731
        controls = {k: v for k, v in (controls or {}).items() if v is not None}
        self.generator.validate(SHORTEST_PROMPT, controls)
        if query_embeds is not None:
            ids = np.asarray(prompt_ids, np.int64)
            query, params = query_embeds, self.generator.validate(ids, controls)
        elif self.image_cache is None:
            query, ids, params = self._image_stages(image, prompt, controls)
        else:
            query, ids, params = self._cached(image, prompt, controls)
        return self.generator.build(
            query, ids, params, stream=stream,
            on_tokens=self._pieces(emit, self.generator.num_query_tokens + len(ids)), on_error=on_error,
            is_cancelled=is_cancelled,
        )

    def _image_stages(self, image: bytes, prompt: bytes | None, controls: dict[str, Any]):
        """-> (query embeddings [Q, E], prompt ids [S], params), the prompt checked before the vision encoder runs."""
        pixels, ids = self.stages.preprocess(image, prompt)
        params = self.generator.validate(ids, controls)
        return self.stages.query_embeds(pixels), ids, params

    def _cached(self, image: bytes, prompt: bytes | None, controls: dict[str, Any]):
        """_image_stages through the image cache: on a hit no stage runs."""
        computed = []

        def compute() -> np.ndarray:
            computed.extend(self._image_stages(image, prompt, controls))
            return computed[0]

        query, hit = self.image_cache.get_or_compute(image_key(image, self._settings), compute)
        if not hit:
            return computed
        ids = encode_prompt(self._prompt_tokenizer, prompt)
        return query, ids, self.generator.validate(ids, controls)

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
