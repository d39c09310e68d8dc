"""The OpenAI-compatible HTTP front door: a Starlette app over the project's async client.

    POST /v1/chat/completions   one `blip2` request per completion (gRPC streaming, replicas)
    GET  /v1/models             the one served model
    GET  /health                200 when a Triton replica is ready, else 503

A client that goes away (closes its HTTP connection, streaming or not) cancels the gRPC call, so
the server frees its sequence. A streamed answer's first piece is awaited before the HTTP response
starts, so a request the model refuses still gets a plain 400.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.request
from typing import Sequence

from blip2_triton.api import PIPELINE
from blip2_triton.client import (
    AsyncBlip2Client, Blip2Error, DeadlineExceededError, InvalidArgumentError, ServerError, UnavailableError,
)

from . import chat
from .chat import OpenAIError

LOGGER = logging.getLogger(__name__)
MAX_REMOTE_IMAGE_BYTES = 32 << 20  # the server refuses larger images anyway
REMOTE_IMAGE_TIMEOUT = 20.0


def create_app(triton_urls: str | Sequence[str], served_model: str = PIPELINE, triton_model: str = PIPELINE,
               allow_remote_images: bool = False, timeout: float | None = 600.0, image_affinity: bool = False):
    """The ASGI app; its client to Triton opens with the app's lifespan and closes with it.

    served_model: the name clients ask for in `model`; triton_model: the Triton model it runs;
    image_affinity: AsyncBlip2Client's (replicas' image caches answer a chat's later turns)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    created = int(time.time())
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with AsyncBlip2Client(triton_urls, triton_model, timeout=timeout, image_affinity=image_affinity) as client:
            state["client"] = client
            yield

    def error(e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def completions(request: Request):
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise OpenAIError("the request body is not valid JSON") from None
            job = chat.parse(body, served_model, allow_remote_images)
            if isinstance(job.image, str):
                job.image = await asyncio.to_thread(_fetch, job.image)
            responses = state["client"].responses(job.image, job.prompt, stream=job.stream, **job.controls)
            if not job.stream:
                return JSONResponse(await _until_disconnected(request, _whole(job, responses)))
            first = await _until_disconnected(request, _first(responses))
        except OpenAIError as e:
            return error(e)
        except Blip2Error as e:
            return error(openai_error(e))
        return StreamingResponse(_events(request, job, responses, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def list_models(request: Request):
        return JSONResponse(chat.models(served_model, created))

    async def get_model(request: Request):
        name = request.path_params["name"]
        if name != served_model:
            return error(OpenAIError(f"The model '{name}' does not exist", "model", "model_not_found", 404))
        return JSONResponse(chat.model(served_model, created))

    async def health(request: Request):
        ready = await state["client"].is_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    return Starlette(routes=[
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], lifespan=lifespan)


def openai_error(e: Blip2Error) -> OpenAIError:
    """The client's typed error -> OpenAI's error shape and HTTP status."""
    if isinstance(e, InvalidArgumentError):
        return OpenAIError(e.message, None, chat.CODES.get(e.reason, "invalid_value"))
    if isinstance(e, UnavailableError):
        return OpenAIError(e.message, None, "service_unavailable", 503, "server_error")
    if isinstance(e, DeadlineExceededError):
        return OpenAIError(e.message, None, "timeout", 504, "server_error")
    return OpenAIError(e.message, None, "server_error", 500, "server_error")


def _fetch(url: str) -> bytes:
    """An http(s) image, at most MAX_REMOTE_IMAGE_BYTES (only with --allow-remote-images)."""
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_IMAGE_TIMEOUT) as r:
            data = r.read(MAX_REMOTE_IMAGE_BYTES + 1)
    except OSError as e:
        raise OpenAIError(f"could not fetch the image at {url}: {e}", "messages", "invalid_image_url") from None
    if len(data) > MAX_REMOTE_IMAGE_BYTES:
        raise OpenAIError(f"the image at {url} is larger than {MAX_REMOTE_IMAGE_BYTES} bytes", "messages",
                          "invalid_image_url")
    return data


async def _whole(job: chat.ChatJob, responses) -> dict:
    text, ids, read = [], 0, 0
    async with contextlib.aclosing(responses):
        async for piece in responses:
            text.append(piece.text)
            ids += len(piece.token_ids)
            read = piece.prompt_tokens
    return chat.completion(job, "".join(text), read, ids)


async def _first(responses):
    """The first response of a stream (None if it had none); closes the stream on failure."""
    try:
        return await responses.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await responses.aclose()
        raise


async def _disconnected(request) -> None:
    """Returns once the HTTP client has gone (its request body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _until_disconnected(request, coroutine):
    """Await `coroutine`, cancelling it if the HTTP client goes away first (raises CancelledError)."""
    task = asyncio.ensure_future(coroutine)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            LOGGER.info("client went away: request cancelled")
            raise asyncio.CancelledError("the HTTP client went away")
        return task.result()
    finally:
        watcher.cancel()
        task.cancel()


def _sse(body: dict | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


async def _events(request, job: chat.ChatJob, responses, first):
    """The SSE stream: a role chunk, one chunk per piece of text, the finishing chunk, the usage
    chunk when asked for, then [DONE]. An error after the start is sent as an error event. The
    gRPC call is cancelled as soon as the client goes away (watched beside the stream)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump():
        try:
            if first is not None:
                await queue.put(first)
                async for piece in responses:
                    await queue.put(piece)
        except Blip2Error as e:
            await queue.put(e)
        except Exception as e:  # a bug here: logged, and the client told, rather than a stream cut short
            LOGGER.exception("streaming a completion failed")
            await queue.put(ServerError(f"internal error: {type(e).__name__}"))
        finally:
            await responses.aclose()
            await queue.put(done)

    producer = asyncio.ensure_future(pump())
    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(lambda _: producer.cancel())
    tokens, read = 0, 0
    try:
        yield _sse(chat.chunk(job, {"role": "assistant", "content": ""}))
        while (item := await queue.get()) is not done:
            if isinstance(item, Blip2Error):
                yield _sse(openai_error(item).body())
                break
            tokens += len(item.token_ids)
            read = item.prompt_tokens
            if item.text:
                yield _sse(chat.chunk(job, {"content": item.text}))
        else:
            yield _sse(chat.chunk(job, {}, chat.finish_reason(job, tokens)))
            if job.include_usage:
                yield _sse(chat.chunk(job, {}, usage_counts=chat.usage(read, tokens), choices=False))
        yield _sse("[DONE]")
    finally:
        watcher.cancel()
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


def serve(triton_urls: Sequence[str], host: str = "127.0.0.1", port: int = 9000, **options) -> None:
    """Run the front door with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(triton_urls, **options), host=host, port=port, log_level="info")
