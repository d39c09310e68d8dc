"""asyncio client for the `blip2` ensemble over gRPC (tritonclient.grpc.aio).

Every call is a gRPC bidirectional stream: the ensemble contains a decoupled (streaming) generator,
and Triton serves decoupled models only through the streaming RPC. A non-streaming call receives
exactly one response.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import numpy as np

from blip2_triton import interface as api

from .errors import Blip2Error, DeadlineExceededError, InvalidArgumentError, from_triton
from .images import ImageLike, image_bytes
from .options import GenerationOptions
from .prompts import chat_prompt, vqa_prompt

DEFAULT_URL = "127.0.0.1:8001"


@dataclass
class Result:
    text: str
    token_ids: list[int] = field(default_factory=list)


def build_inputs(image: bytes, prompt: str, stream: bool, options: GenerationOptions):
    """The ensemble's input tensors for one request (each with a batch dimension of 1)."""
    from tritonclient.grpc import InferInput

    def tensor(spec, value):
        array = np.asarray([[value]], dtype=spec.np_dtype)
        t = InferInput(spec.name, list(array.shape), _TRITON[spec.dtype])
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor(api.IMAGE, image), tensor(api.PROMPT, prompt.encode("utf-8")), tensor(api.STREAM, stream)]
    controls = {t.name: t for t in api.CONTROLS}
    inputs += [tensor(controls[name], value) for name, value in options.items()]
    return inputs


_TRITON = {"bytes": "BYTES", "bool": "BOOL", "int32": "INT32", "int64": "INT64", "float32": "FP32"}


class AsyncBlip2Client:
    """Caption, ask, chat and stream against a served `blip2` ensemble.

    Generation controls are keyword arguments named as in transformers' generate()
    (max_new_tokens, num_beams, do_sample, top_p, ...); absent ones take the checkpoint's defaults.
    `timeout` (seconds) bounds each call; DeadlineExceededError when it runs out.
    """

    def __init__(self, url: str = DEFAULT_URL, model: str = api.ENSEMBLE, timeout: float | None = 120.0):
        from tritonclient.grpc.aio import InferenceServerClient

        self.url, self.model, self.timeout = url, model, timeout
        self._client = InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncBlip2Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def is_ready(self) -> bool:
        try:
            return bool(await self._client.is_model_ready(self.model))
        except Exception:
            return False

    # ---- workflows ------------------------------------------------------------------------
    async def caption(self, image: ImageLike, prompt: str = "", **controls) -> Result:
        """Caption an image, optionally continuing `prompt` (e.g. "a photo of")."""
        return await self.generate(image, prompt, **controls)

    async def ask(self, image: ImageLike, question: str, **controls) -> Result:
        """Visual question answering with BLIP-2's "Question: ... Answer:" format."""
        return await self.generate(image, vqa_prompt(question), **controls)

    async def chat(self, image: ImageLike, history: Sequence[tuple[str, str]], question: str, **controls) -> Result:
        """Answer `question` with the earlier (question, answer) turns as context.

        When the context does not fit the language model, the oldest turns are dropped first.
        """
        history = list(history)
        while True:
            try:
                return await self.generate(image, chat_prompt(history, question), **controls)
            except InvalidArgumentError as e:
                if not history or not _is_context_overflow(e):
                    raise
                history = history[1:]

    async def batch(self, images: Sequence[ImageLike], prompts: Sequence[str] | str = "", **controls) -> list[Result]:
        """Many requests at once, sent concurrently; results in input order.

        `prompts` is one prompt for all images or one per image; a single image with many prompts
        is also accepted.
        """
        images, prompts = _pair(images, prompts)
        return list(await asyncio.gather(*(self.generate(i, p, **controls) for i, p in zip(images, prompts))))

    async def generate(self, image: ImageLike, prompt: str = "", **controls) -> Result:
        """One request, one response: the whole generated text and its token ids."""
        text, ids = [], []
        async for piece, piece_ids in self._responses(image, prompt, stream=False, controls=controls):
            text.append(piece)
            ids += piece_ids
        return Result("".join(text), ids)

    async def stream(self, image: ImageLike, prompt: str = "", **controls) -> AsyncIterator[str]:
        """Text pieces as tokens are generated; they concatenate to the whole text."""
        async for piece, _ in self._responses(image, prompt, stream=True, controls=controls):
            if piece:
                yield piece

    # ---- transport ------------------------------------------------------------------------
    async def _responses(self, image: ImageLike, prompt: str, stream: bool, controls: dict):
        options = GenerationOptions.from_kwargs(controls)  # raises InvalidArgumentError early
        inputs = build_inputs(image_bytes(image), prompt, stream, options)
        request_id = uuid.uuid4().hex

        async def requests():
            yield {"model_name": self.model, "inputs": inputs, "request_id": request_id}

        responses = self._client.stream_infer(requests(), stream_timeout=self.timeout)
        try:
            async for result, error in _with_deadline(responses, self.timeout):
                if error is not None:
                    raise from_triton(error)
                text = result.as_numpy(api.TEXT.name)
                ids = result.as_numpy(api.TOKEN_IDS.name)
                yield (text.reshape(-1)[0].decode("utf-8") if text is not None else ""), (
                    ids.reshape(-1).tolist() if ids is not None else [])
                final = result.as_numpy(api.FINAL.name)
                if final is not None and bool(final.reshape(-1)[0]):
                    return
        except Blip2Error:
            raise
        except asyncio.CancelledError:
            responses.cancel()
            raise
        except Exception as e:
            raise from_triton(e) from e
        finally:
            responses.cancel()


async def _with_deadline(responses, timeout: float | None):
    iterator = responses.__aiter__()
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError(f"no complete answer within {timeout}s")
        try:
            item = await asyncio.wait_for(iterator.__anext__(), remaining)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise DeadlineExceededError(f"no complete answer within {timeout}s") from None
        yield item


def _is_context_overflow(error: InvalidArgumentError) -> bool:
    return "context" in error.message and ("prompt" in error.message or "max_new_tokens" in error.message)


def _pair(images, prompts) -> tuple[list, list[str]]:
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(images)
    elif len(images) == 1:
        images = images * len(prompts)
    if len(images) != len(prompts):
        raise InvalidArgumentError(f"{len(images)} images but {len(prompts)} prompts: give one prompt, or one per image")
    return images, prompts
