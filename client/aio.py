"""asyncio client for the `blip2` model over gRPC (tritonclient.grpc.aio).

Every call is a gRPC bidirectional stream: `blip2` is a decoupled (streaming) model, and Triton
serves decoupled models only through the streaming RPC. A non-streaming call receives
exactly one response.

Timeouts bound a whole call (DeadlineExceededError), retries included. Cancelling the task
awaiting a call, closing a `stream()` iterator, or a deadline ends the call for its caller at once;
the client then stops the request on the server without cancelling its gRPC stream (_wind_down:
a `stop` for its request id on the same stream, read on to the final responses), since
cancelling a stream can crash tritonserver 2.51. A stop also reaches a generation that an
ensemble step runs, which a cancellation does not.

Several URLs make a client of replicas (replicas.py): each request goes to the ready one with the
fewest of this client's requests outstanding. A request that fails with UnavailableError (nothing
listening, the server went away, a model process died, the model is not loaded there) before its
first response is sent again to the next replica; one that fails after it (a stream that produced
text) raises UnavailableError saying how much it had received, since that text was handed out.

Streams are reused: a call that ends with its final answer leaves its gRPC stream open for the
next call (one call at a time per stream), and so does one the server refused (its error
response is the request's final one) and one wound down after its caller left; only a failed
transport ends a stream. tritonserver 2.51 keeps a few KiB for every stream ever opened
(measured: benchmarks/README.md, "Soak"), so a stream per call made its memory grow without bound.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import numpy as np

from blip2_triton import api

from .errors import Blip2Error, DeadlineExceededError, InvalidArgumentError, UnavailableError, from_triton
from .images import ImageLike, image_bytes
from .options import GenerationOptions
from .prompts import chat_prompt, vqa_prompt
from .replicas import DEFAULT_HEALTH_INTERVAL, Replica, Replicas, ReplicaStatus, parse_urls
from .retrieval import RetrievalCalls

log = logging.getLogger("blip2_triton.client")

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_TIMEOUT = 120.0
STOP_TIMEOUT = 5.0  # seconds close() waits for calls left early to be wound down
WIND_DOWN_TIMEOUT = 30.0  # seconds for a stopped call's last responses before its stream is cancelled
MAX_IDLE_STREAMS = 16  # open streams kept for reuse; more, after a burst of concurrent calls, are closed
# gRPC waits ever longer between attempts to reconnect to a server that went away (1 s, then 1.6x
# each time, up to 120 s), and the clients of one process share that wait. A server restarted
# because a model process died is back within seconds: reconnect attempts stay this close.
RECONNECT_BACKOFF_MS = (250, 1000)  # first, longest


@dataclass
class Result:
    """One answer: the generated text, its token ids, and the prompt that produced it.

    dropped_turns: for `chat`, how many of the oldest history turns were left out so that the
    prompt fits the language model's context (0 otherwise).
    prompt_tokens: the tokens the model read before generating (image query tokens + prompt), as
    the server counted them; `len(token_ids)` is the count of generated ones.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    prompt: str = ""
    dropped_turns: int = 0
    prompt_tokens: int = 0


def build_inputs(image: bytes, prompt: str, stream: bool, options: GenerationOptions):
    """The `blip2` model's input tensors for one request (each with a batch dimension of 1)."""
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


class AsyncBlip2Client(RetrievalCalls):
    """Caption, ask, chat and stream against a served `blip2` model; match, embed_image and
    embed_text against a served retrieval checkpoint (client/retrieval.py).

    Generation controls are keyword arguments named as in transformers' generate()
    (max_new_tokens, num_beams, do_sample, top_p, ...); absent ones take the checkpoint's defaults.
    `timeout` (seconds, None for none) bounds each call; DeadlineExceededError when it runs out.
    Nothing connects before the first call: a wrong URL or a stopped server is an
    UnavailableError then.
    """

    def __init__(self, url: str | Sequence[str] = DEFAULT_URL, model: str = api.PIPELINE,
                 timeout: float | None = DEFAULT_TIMEOUT, health_interval: float = DEFAULT_HEALTH_INTERVAL,
                 image_affinity: bool = False):
        """`url`: one server's gRPC address "host:port", or several replicas' (a list or tuple).
        `health_interval`: seconds between readiness probes of each replica (several URLs only).
        `image_affinity`: among replicas equally busy, send requests on one image to the same one
        (its image cache then answers follow-up questions) instead of taking them in turn."""
        from tritonclient.grpc.aio import InferenceServerClient

        if timeout is not None and timeout <= 0:
            raise InvalidArgumentError(f"timeout must be > 0 seconds (or None), got {timeout}")
        if not health_interval > 0:
            raise InvalidArgumentError(f"health_interval must be > 0 seconds, got {health_interval}")
        self.urls = parse_urls(url)
        self.url = self.urls[0] if len(self.urls) == 1 else ",".join(self.urls)
        self.model, self.timeout, self.image_affinity = model, timeout, image_affinity
        self._replicas = Replicas(self.urls, model, lambda u: InferenceServerClient(u, channel_args=_channel_args()),
                                  health_interval)
        self._winding_down: set[asyncio.Task] = set()  # calls left early being wound down (_wind_down)
        self._idle: dict[str, list[_Stream]] = {}  # per replica URL
        self.streams_opened = 0  # gRPC streams this client has opened (the soak relates server memory to it)

    async def close(self) -> None:
        if self._winding_down:  # calls left early are wound down before the streams close
            await asyncio.wait(self._winding_down, timeout=STOP_TIMEOUT)
        for idle in self._idle.values():
            while idle:
                idle.pop().cancel()
        await self._replicas.close()

    async def __aenter__(self) -> "AsyncBlip2Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def is_ready(self) -> bool:
        """True when a server answers and serves the model (any replica); never raises."""
        return any(await self._replicas.probe_all())

    @property
    def replicas(self) -> list[ReplicaStatus]:
        """What this client knows of each server: readiness, requests outstanding and sent."""
        return self._replicas.status()

    # ---- workflows ------------------------------------------------------------------------
    async def caption(self, image: ImageLike, prompt: str = "", **controls) -> Result:
        """Caption an image, optionally continuing `prompt` (e.g. "a photo of")."""
        return await self.generate(image, prompt, **controls)

    async def ask(self, image: ImageLike, question: str, **controls) -> Result:
        """Visual question answering with BLIP-2's "Question: ... Answer:" format."""
        return await self.generate(image, vqa_prompt(question), **controls)

    async def ask_many(self, image: ImageLike, questions: Sequence[str], **controls) -> list[Result]:
        """Several questions about one image, sent concurrently; results in question order.

        The image goes with every request; a server with its image cache on runs the image stages
        once for all of them. If one request fails, the others are cancelled and its error is raised.
        """
        return await self.batch([image_bytes(image)], [vqa_prompt(q) for q in questions], **controls)

    async def chat(self, image: ImageLike, history: Sequence[tuple[str, str]], question: str, **controls) -> Result:
        """Answer `question` with the earlier (question, answer) turns as context.

        The prompt is `chat_prompt(history, question)`. When it does not fit the language model's
        context (with room for max_new_tokens), the oldest turns are dropped, one at a time, until
        it does; `Result.dropped_turns` says how many. Each rejected attempt costs one round trip
        that the server refuses before decoding.
        """
        image = image_bytes(image)  # encoded once for every attempt
        result, dropped = await _fit_history(
            history, question, lambda prompt: self.generate(image, prompt, **controls))
        result.dropped_turns = dropped
        return result

    async def chat_stream(self, image: ImageLike, history: Sequence[tuple[str, str]], question: str,
                          **controls) -> AsyncIterator[str]:
        """`chat`, streamed: text pieces as they are generated (oldest turns dropped as in `chat`)."""
        image = image_bytes(image)

        async def first_piece(prompt: str):
            pieces = self.stream(image, prompt, **controls).__aiter__()
            try:  # a prompt that does not fit is rejected before the first piece
                return pieces, [await pieces.__anext__()]
            except StopAsyncIteration:
                return pieces, []
            except BaseException:
                await pieces.aclose()
                raise

        pieces, first = (await _fit_history(history, question, first_piece))[0]
        try:
            for piece in first:
                yield piece
            async for piece in pieces:
                yield piece
        finally:
            await pieces.aclose()

    async def batch(self, images: Sequence[ImageLike], prompts: Sequence[str] | str = "", **controls) -> list[Result]:
        """Many requests at once, sent concurrently; results in input order.

        `prompts` is one prompt for all images or one per image; a single image with many prompts
        is also accepted. If one request fails, the others are cancelled and its error is raised.
        """
        images, prompts = _pair(images, prompts)
        tasks = [asyncio.ensure_future(self.generate(i, p, **controls)) for i, p in zip(images, prompts)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def generate(self, image: ImageLike, prompt: str = "", **controls) -> Result:
        """One request, one response: the whole generated text and its token ids."""
        text, ids, read = [], [], 0
        async with contextlib.aclosing(self._responses(image, prompt, stream=False, controls=controls)) as responses:
            async for piece in responses:
                text.append(piece.text)
                ids += piece.token_ids
                read = piece.prompt_tokens
        return Result("".join(text), ids, prompt, prompt_tokens=read)

    async def stream(self, image: ImageLike, prompt: str = "", **controls) -> AsyncIterator[str]:
        """Text pieces as tokens are generated; they concatenate to the whole text.

        Beam search answers once, at the end. Closing the iterator early cancels the call.
        """
        # aclosing: closing this iterator closes the call at once, not when garbage collected
        async with contextlib.aclosing(self._responses(image, prompt, stream=True, controls=controls)) as responses:
            async for piece in responses:
                if piece.text:
                    yield piece.text

    # ---- transport ------------------------------------------------------------------------
    async def responses(self, image: ImageLike, prompt: str = "", stream: bool = True, **controls):
        """Every response of one request, as `Piece`s (text, token ids, prompt tokens, final), for
        callers that need more than the text (the OpenAI front door's usage counts)."""
        async with contextlib.aclosing(self._responses(image, prompt, stream=stream, controls=controls)) as responses:
            async for piece in responses:
                yield piece

    async def _responses(self, image: ImageLike, prompt: str, stream: bool, controls: dict):
        """The Piece of each response until the final one; typed errors only.

        Replicas are tried in `Replicas.order()`, each once, while they fail with UnavailableError
        before their first response; the deadline covers every attempt."""
        options = GenerationOptions.from_kwargs(controls)  # raises InvalidArgumentError early
        image = image_bytes(image)
        inputs = build_inputs(image, prompt, stream, options)
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        self._replicas.watch()
        failures: list[str] = []
        affinity = None
        if self.image_affinity and len(self._replicas) > 1:
            affinity = hashlib.blake2b(image, digest_size=16).digest()
        for replica in self._replicas.order(affinity):
            text: list[str] = []
            ids: list[int] = []
            responses = 0
            try:
                # aclosing: a caller that stops early ends the gRPC call now, not at garbage collection
                with replica.attempt():
                    async with contextlib.aclosing(self._attempt(replica, inputs, deadline)) as attempt:
                        async for piece in attempt:
                            responses += 1
                            text.append(piece.text)
                            ids += piece.token_ids
                            yield piece
                return
            except UnavailableError as e:
                self._replicas.mark_down(replica)
                if responses:
                    raise UnavailableError(
                        f"{replica.url} (model {self.model!r}) went away after {responses} response(s) of the "
                        f"stream had arrived ({len(ids)} tokens, {len(''.join(text))} characters of text); not sent "
                        f"again, since that text was already delivered: {e.message}",
                        e.status, "".join(text), ids) from e
                if len(self._replicas) == 1:
                    raise
                failures.append(e.message)
        raise UnavailableError(f"no replica could serve the request: {'; '.join(failures)}")

    async def _unary(self, model: str, call):
        """`await call(grpc_client)` for a one-response model (the retrieval models), on the replicas
        in `Replicas.order()`: one that is unavailable is marked down and the next one tried (a
        unary call delivered nothing before it failed)."""
        self._replicas.watch()
        failures: list[str] = []
        for replica in self._replicas.order():
            try:
                with replica.attempt():
                    try:
                        return await call(replica.client)
                    except Blip2Error:
                        raise
                    except Exception as e:  # InferenceServerException, grpc errors: one typed error each
                        raise self._typed(e, replica, model) from e
            except UnavailableError as e:
                self._replicas.mark_down(replica)
                if len(self._replicas) == 1:
                    raise
                failures.append(e.message)
        raise UnavailableError(f"no replica could serve the request: {'; '.join(failures)}")

    async def _attempt(self, replica: Replica, inputs, deadline: float | None):
        """The Piece of each response of one request sent to one replica, on one of its idle
        streams when there is one (see the module docstring)."""
        request = {"model_name": self.model, "inputs": inputs, "request_id": uuid.uuid4().hex}
        loop = asyncio.get_running_loop()
        if deadline is not None and deadline - loop.time() <= 0:
            raise DeadlineExceededError(_deadline_message(self.timeout))
        idle = self._idle.setdefault(replica.url, [])
        stream, fresh = _take_stream(idle, replica.client)
        self.streams_opened += fresh
        done = received = False
        try:
            while True:
                stream.send(request)
                try:
                    # The deadline is the client's own (a reused stream has none): when it runs out
                    # the stream is cancelled, which tells the server.
                    async for result, error in _with_deadline(stream, deadline, self.timeout):
                        received = True
                        if error is not None:  # the request's final response: the stream stays usable
                            done = True
                            raise self._typed(error, replica)
                        piece = _piece(result)
                        done = piece.final
                        yield piece
                        if done:
                            return
                    raise _StreamEnded("the server closed the stream before the final answer")
                except Exception as e:
                    # A reused stream that the server dropped while idle (it restarted) fails before
                    # any answer: send the request once more, on a new stream.
                    if fresh or received or (isinstance(e, Blip2Error) and not isinstance(e, _StreamEnded)):
                        raise
                    stream.cancel()
                    stream, fresh = _Stream(replica.client), True
                    self.streams_opened += 1
        except _StreamEnded as e:
            raise self._typed(UnavailableError(e.message), replica) from None
        except Blip2Error:
            raise
        except Exception as e:  # transport errors (grpc.aio.AioRpcError, InferenceServerException)
            raise self._typed(e, replica) from e
        finally:  # done: the stream serves the next call; left early (cancelled, closed, timed out): wind it down
            if not done and stream.is_open():
                task = asyncio.get_running_loop().create_task(self._wind_down(replica, stream, request["request_id"]))
                self._winding_down.add(task)
                task.add_done_callback(self._winding_down.discard)
            else:
                self._release(replica, stream, done)

    async def _wind_down(self, replica: Replica, stream: "_Stream", request_id: str) -> None:
        """End a call its caller left early without cancelling its gRPC stream: ask `blip2` to stop
        generating for `request_id` (api.STOP) on that stream, read on to the final responses of
        both requests, and keep the stream for the next call.

        Cancelling the stream instead crashes tritonserver 2.51 at times (a SIGSEGV in its gRPC
        front end when a cancellation meets a request's last response; fixed upstream after 2.51).
        A stop also reaches a generation an ensemble step runs, which a cancellation does not.
        When the two final responses do not come within WIND_DOWN_TIMEOUT, the stream is cancelled
        after all."""
        from tritonclient.grpc import InferInput

        stop = InferInput(api.STOP.name, [1, 1], _TRITON[api.STOP.dtype])
        stop.set_data_from_numpy(np.asarray([[True]]))
        finals = 0
        try:
            stream.send({"model_name": api.PIPELINE, "inputs": [stop], "request_id": request_id})
            async with asyncio.timeout(WIND_DOWN_TIMEOUT):
                async for result, error in stream:
                    if error is not None or _piece(result).final:
                        finals += 1
                        if finals == 2:  # the stopped request's last response, and the stop's
                            break
        except Exception as e:  # noqa: BLE001  (transport errors of every kind: the caller has left, so logged)
            log.warning("could not stop request %s: %s", request_id, e)
        finally:
            self._release(replica, stream, finals == 2)

    def _release(self, replica: Replica, stream: "_Stream", reusable: bool) -> None:
        """Keep a stream whose requests have all ended for the next call (up to MAX_IDLE_STREAMS),
        else end it."""
        idle = self._idle.setdefault(replica.url, [])
        if reusable and stream.is_open() and len(idle) < MAX_IDLE_STREAMS:
            idle.append(stream)
        else:
            stream.cancel()

    def _typed(self, error: BaseException, replica: Replica, model: str | None = None) -> Blip2Error:
        """The typed error for what the transport or the server reported; timeouts and
        unavailability name the timeout or the server (and `model`, by default the client's)."""
        error = from_triton(error)
        if isinstance(error, DeadlineExceededError):
            return DeadlineExceededError(_deadline_message(self.timeout))
        if isinstance(error, UnavailableError):
            # ResourceExhaustedError too, keeping its type
            return type(error)(f"{replica.url} (model {model or self.model!r}) unavailable: {error.message}",
                               error.status)
        return error


@dataclass(frozen=True)
class Piece:
    """One response of the `blip2` model: its new text and token ids, the prompt's token count
    (api.PROMPT_TOKENS; 0 from a server without that output), and whether it is the last."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    final: bool


def _piece(result) -> Piece:
    def first(tensor, default):
        value = result.as_numpy(tensor.name)
        return value.reshape(-1)[0] if value is not None and value.size else default

    ids = result.as_numpy(api.TOKEN_IDS.name)
    text = first(api.TEXT, b"")
    return Piece(text.decode("utf-8"), ids.reshape(-1).tolist() if ids is not None else [],
                 int(first(api.PROMPT_TOKENS, 0)), bool(first(api.FINAL, False)))


class _StreamEnded(UnavailableError):
    """The server ended a stream without the call's final answer (it stopped or restarted)."""


_END = object()  # the stream's responses have ended


class _Stream:
    """One gRPC bidirectional stream (ModelStreamInfer) carrying one call at a time: requests go in
    through a queue, responses come out as (result, error) pairs.

    A task of its own reads the gRPC call into a queue, and callers read the queue: a caller
    cancelled while it waits for a response then leaves the call open, where a cancelled gRPC read
    would cancel the call itself (grpc.aio does), which is what the client avoids (see
    AsyncBlip2Client._wind_down)."""

    def __init__(self, client):
        self._requests: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (request := await self._requests.get()) is not None:
                yield request

        self._call = client.stream_infer(requests())
        self._responses: asyncio.Queue = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="blip2-stream-reader")

    async def _read(self) -> None:
        try:
            async for item in self._call:
                self._responses.put_nowait(item)
        except Exception as e:  # noqa: BLE001  (the transport's error, raised to the caller reading next)
            self._responses.put_nowait(e)
        finally:
            self._responses.put_nowait(_END)

    def send(self, request: dict) -> None:
        self._requests.put_nowait(request)

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._responses.get()
        if item is _END:
            self._responses.put_nowait(_END)  # ended for every later read too
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def is_open(self) -> bool:
        call = getattr(self._call, "_grpc_call", None)
        return call is None or not call.done()

    def cancel(self) -> None:
        self._requests.put_nowait(None)
        self._call.cancel()


def _take_stream(idle: list[_Stream], client) -> tuple[_Stream, bool]:
    """An open stream from `idle` (and False), or a new one on `client` (and True)."""
    while idle:
        stream = idle.pop()
        if stream.is_open():
            return stream, False
        stream.cancel()
    return _Stream(client), True


def _channel_args() -> list[tuple[str, int]]:
    """tritonclient's own channel arguments (which passing any replaces), and RECONNECT_BACKOFF_MS."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


def _deadline_message(timeout: float | None) -> str:
    return f"no complete answer within the {timeout:g}s timeout"


async def _with_deadline(responses, deadline: float | None, timeout: float | None):
    """The items of `responses` until the loop's clock reaches `deadline` (None: no limit)."""
    iterator = responses.__aiter__()
    loop = asyncio.get_running_loop()
    while True:
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError(_deadline_message(timeout))
        try:
            item = await asyncio.wait_for(iterator.__anext__(), remaining)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise DeadlineExceededError(_deadline_message(timeout)) from None
        yield item


async def _fit_history(history: Sequence[tuple[str, str]], question: str, attempt):
    """await attempt(chat_prompt(turns, question)) with the oldest turns dropped, one at a time,
    while the server rejects the prompt as too long. Returns (what attempt returned, turns dropped)."""
    history = list(history)
    dropped = 0
    while True:
        try:
            return await attempt(chat_prompt(history[dropped:], question)), dropped
        except InvalidArgumentError as e:
            if dropped == len(history) or not is_context_overflow(e):
                raise
            dropped += 1


def is_context_overflow(error: InvalidArgumentError) -> bool:
    """Is this rejection about the prompt being too long for the model (so a shorter one may fit)?
    Decided by the refusal's reason code, never by its wording."""
    return error.reason is api.Reason.CONTEXT_EXCEEDED


def _pair(images, prompts) -> tuple[list, list[str]]:
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(images)
    elif len(images) == 1:
        images = images * len(prompts)
    if len(images) != len(prompts):
        raise InvalidArgumentError(f"{len(images)} images but {len(prompts)} prompts: give one prompt, or one per image",
                                   reason=api.Reason.INPUT)
    return images, prompts
