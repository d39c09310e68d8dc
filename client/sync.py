"""Blocking client: the asyncio client run on a private event-loop thread.

One implementation serves both APIs, so the sync and async clients cannot drift apart.
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from typing import Iterator, Sequence

import numpy as np

from blip2_triton import api

from .aio import DEFAULT_TIMEOUT, DEFAULT_URL, AsyncBlip2Client, Result
from .images import ImageLike
from .retrieval import Match
from .replicas import DEFAULT_HEALTH_INTERVAL, ReplicaStatus

_DONE = object()


class Blip2Client:
    """Blocking twin of AsyncBlip2Client: same methods, same arguments, same exceptions."""

    def __init__(self, url: str | Sequence[str] = DEFAULT_URL, model: str = api.PIPELINE,
                 timeout: float | None = DEFAULT_TIMEOUT, health_interval: float = DEFAULT_HEALTH_INTERVAL,
                 image_affinity: bool = False):
        self._loop = asyncio.new_event_loop()
        self._calls: set[asyncio.Task] = set()  # calls running on the loop (touched on the loop only)
        self._thread = threading.Thread(target=self._loop.run_forever, name="blip2-client", daemon=True)
        self._thread.start()
        try:
            self._async = self._run(_make_async(url, model, timeout, health_interval, image_affinity))
        except BaseException:
            self._stop_loop()
            raise

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def urls(self) -> tuple[str, ...]:
        return self._async.urls

    @property
    def replicas(self) -> list[ReplicaStatus]:
        return self._async.replicas

    @property
    def model(self) -> str:
        return self._async.model

    @property
    def timeout(self) -> float | None:
        return self._async.timeout

    def _run(self, coroutine):
        """Run `coroutine` on the client's loop as a call (close() ends the calls still running);
        an interrupt (Ctrl-C) here cancels it."""
        future = asyncio.run_coroutine_threadsafe(self._call(coroutine), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def _call(self, coroutine):
        task = asyncio.current_task()
        self._calls.add(task)
        try:
            return await coroutine
        finally:
            self._calls.discard(task)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def close(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(_close_and_drain(self._async, self._calls), self._loop).result()
            self._stop_loop()

    def __enter__(self) -> "Blip2Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self) -> bool:
        return self._run(self._async.is_ready())

    def caption(self, image: ImageLike, prompt: str = "", **controls) -> Result:
        return self._run(self._async.caption(image, prompt, **controls))

    def ask(self, image: ImageLike, question: str, **controls) -> Result:
        return self._run(self._async.ask(image, question, **controls))

    def ask_many(self, image: ImageLike, questions: Sequence[str], **controls) -> list[Result]:
        return self._run(self._async.ask_many(image, questions, **controls))

    def chat(self, image: ImageLike, history: Sequence[tuple[str, str]], question: str, **controls) -> Result:
        return self._run(self._async.chat(image, history, question, **controls))

    def chat_stream(self, image: ImageLike, history: Sequence[tuple[str, str]], question: str,
                    **controls) -> Iterator[str]:
        """`chat`, streamed; closing the iterator early cancels the request."""
        return self._iterate(self._async.chat_stream(image, history, question, **controls))

    def batch(self, images: Sequence[ImageLike], prompts: Sequence[str] | str = "", **controls) -> list[Result]:
        return self._run(self._async.batch(images, prompts, **controls))

    def generate(self, image: ImageLike, prompt: str = "", **controls) -> Result:
        return self._run(self._async.generate(image, prompt, **controls))

    def stream(self, image: ImageLike, prompt: str = "", **controls) -> Iterator[str]:
        """Text pieces as they are generated; closing the iterator early cancels the request."""
        return self._iterate(self._async.stream(image, prompt, **controls))

    def match(self, image: ImageLike, text: str) -> Match:
        return self._run(self._async.match(image, text))

    def matches(self, image: ImageLike, texts: Sequence[str]) -> list[Match]:
        return self._run(self._async.matches(image, texts))

    def embed_image(self, image: ImageLike) -> np.ndarray:
        return self._run(self._async.embed_image(image))

    def embed_text(self, text: str) -> np.ndarray:
        return self._run(self._async.embed_text(text))

    def index(self, index, directory, concurrency: int = 8, progress=None):
        return self._run(self._async.index(index, directory, concurrency, progress))

    def search_text(self, index, text: str, top_k: int = 5, rerank: int = 0):
        return self._run(self._async.search_text(index, text, top_k, rerank))

    def search_image(self, index, image: ImageLike, top_k: int = 5):
        return self._run(self._async.search_image(index, image, top_k))

    def _iterate(self, iterator) -> Iterator[str]:
        """Items of an async iterator run on the client's loop, as a blocking iterator."""
        pieces: queue.Queue = queue.Queue()

        async def pump():
            try:
                # aclosing: a cancelled pump closes the iterator at once (ending its call), not when collected
                async with contextlib.aclosing(iterator):
                    async for piece in iterator:
                        pieces.put(piece)
            except Exception as e:  # handed to the consuming thread; cancellation is not
                pieces.put(e)
            finally:
                pieces.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(self._call(pump()), self._loop)
        try:
            while (item := pieces.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:  # closed early, or interrupted: ends the call (which the client stops on the server)
            future.cancel()


async def _close_and_drain(client: AsyncBlip2Client, calls: set[asyncio.Task]) -> None:
    """End the calls still running (an iterator closed just before may still be unwinding) and let
    them start their wind-downs, close the client (which waits for those), then finish what gRPC
    still has scheduled on the loop (a call's status handler can outlive the call briefly): a
    loop stopped under a pending task makes asyncio print "Task was destroyed but it is pending!"
    when it is collected. Only the calls are cancelled first: cancelling the tasks gRPC runs for
    a stream would keep a wind-down's stop from being sent."""
    running = list(calls)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    await client.close()
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def _make_async(url, model, timeout, health_interval, image_affinity=False) -> AsyncBlip2Client:
    return AsyncBlip2Client(url, model, timeout, health_interval, image_affinity)
