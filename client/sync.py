"""Blocking client: the asyncio client run on a private event-loop thread.

One implementation serves both APIs, so the sync and async clients cannot drift apart.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import Iterator, Sequence

from blip2_triton import interface as api

from .aio import DEFAULT_URL, AsyncBlip2Client, Result
from .images import ImageLike


class Blip2Client:
    """Blocking twin of AsyncBlip2Client: same methods, same arguments, same exceptions."""

    def __init__(self, url: str = DEFAULT_URL, model: str = api.ENSEMBLE, timeout: float | None = 120.0):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="blip2-client", daemon=True)
        self._thread.start()
        self._async = self._run(_make_async(url, model, timeout))

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

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

    def chat(self, image: ImageLike, history: Sequence[tuple[str, str]], question: str, **controls) -> Result:
        return self._run(self._async.chat(image, history, question, **controls))

    def batch(self, images: Sequence[ImageLike], prompts: Sequence[str] | str = "", **controls) -> list[Result]:
        return self._run(self._async.batch(images, prompts, **controls))

    def generate(self, image: ImageLike, prompt: str = "", **controls) -> Result:
        return self._run(self._async.generate(image, prompt, **controls))

    def stream(self, image: ImageLike, prompt: str = "", **controls) -> Iterator[str]:
        """Text pieces as they are generated; closing the iterator early cancels the request."""
        pieces: queue.Queue = queue.Queue()
        done = object()

        async def pump():
            try:
                async for piece in self._async.stream(image, prompt, **controls):
                    pieces.put(piece)
            except BaseException as e:  # handed to the consuming thread
                pieces.put(e)
            finally:
                pieces.put(done)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()


async def _make_async(url, model, timeout) -> AsyncBlip2Client:
    return AsyncBlip2Client(url, model, timeout)
