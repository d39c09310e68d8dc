"""The client's error mapping without a server: every gRPC status and stream phrase to its typed
exception, refusal reasons read from messages, and chat's turn dropping keyed on the reason.

Only these mapping functions get constructed exceptions; tests/test_client.py meets the real ones.
"""
from __future__ import annotations

import asyncio

import pytest

from blip2_triton.api import refusal_message
from blip2_triton.client import (
    AsyncBlip2Client,
    Blip2Error,
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    Reason,
    ResourceExhaustedError,
    Result,
    ServerError,
    UnavailableError,
    chat_prompt,
)
from blip2_triton.client.aio import is_context_overflow
from blip2_triton.client.errors import from_status, from_triton


def _grpc_codes():
    import grpc

    return {code.name: code for code in grpc.StatusCode}


EXPECTED_BY_STATUS = {
    "OK": ServerError, "CANCELLED": CancelledError, "UNKNOWN": ServerError, "INVALID_ARGUMENT": InvalidArgumentError,
    "DEADLINE_EXCEEDED": DeadlineExceededError, "NOT_FOUND": UnavailableError, "ALREADY_EXISTS": ServerError,
    "PERMISSION_DENIED": ServerError, "RESOURCE_EXHAUSTED": ResourceExhaustedError, "FAILED_PRECONDITION": ServerError,
    "ABORTED": ServerError, "OUT_OF_RANGE": InvalidArgumentError, "UNIMPLEMENTED": ServerError,
    "INTERNAL": ServerError, "UNAVAILABLE": UnavailableError, "DATA_LOSS": ServerError,
    "UNAUTHENTICATED": ServerError,
}


def test_every_grpc_status_has_an_expected_exception():
    assert set(EXPECTED_BY_STATUS) == set(_grpc_codes())


@pytest.mark.parametrize("name", sorted(EXPECTED_BY_STATUS))
def test_from_status_maps_each_grpc_status(name):
    code = _grpc_codes()[name]
    for status in (code, str(code), name):  # grpc.StatusCode, tritonclient's "StatusCode.X", the bare name
        error = from_status(status, "the message")
        assert type(error) is EXPECTED_BY_STATUS[name] and error.message == "the message"
        assert isinstance(error, Blip2Error) and error.status == name


@pytest.mark.parametrize("message,expected", [
    ("in ensemble 'blip2', invalid argument [image]: image: empty", InvalidArgumentError),
    ("in ensemble 'blip2', invalid argument: image: empty", InvalidArgumentError),  # an older server
    ("in ensemble 'blip2', cancelled: cancelled by the client", CancelledError),
    ("in ensemble 'blip2', internal error: RuntimeError: boom (expected shape)", ServerError),
    ("Request for unknown model: 'foo' is not found", UnavailableError),
    ("inference request for unknown model 'foo'", UnavailableError),
    ("unexpected datatype TYPE_FP32 for inference input 'max_new_tokens', expecting TYPE_INT32", InvalidArgumentError),
    ("unexpected shape for input 'max_new_tokens' for model 'blip2'", InvalidArgumentError),
    ("[request id: <id_unknown>] input 'image' batch size does not match other inputs for 'blip2'", InvalidArgumentError),
    ("something else went wrong", ServerError),
    ("resource exhausted: 64 requests are waiting already (this server's max_queue_size); retry later",
     ResourceExhaustedError),
    ("resource exhausted: model 'qformer': Exceeds maximum queue size", ResourceExhaustedError),
])
def test_stream_messages_without_a_status_are_typed_by_their_phrase(message, expected):
    for status in (None, "StatusCode.UNKNOWN"):
        assert type(from_status(status, message)) is expected


def test_from_triton_reads_tritonclient_and_grpc_errors():
    import grpc
    from grpc.aio import AioRpcError, Metadata
    from tritonclient.utils import InferenceServerException

    unavailable = from_triton(InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE"))
    assert type(unavailable) is UnavailableError and unavailable.message == "connection refused"
    in_stream = from_triton(InferenceServerException("in ensemble 'blip2', invalid argument: prompt: too long"))
    assert type(in_stream) is InvalidArgumentError
    rpc = AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, Metadata(), Metadata(), details="Deadline Exceeded")
    assert type(from_triton(rpc)) is DeadlineExceededError and from_triton(rpc).message == "Deadline Exceeded"
    assert type(from_triton(RuntimeError("boom"))) is ServerError
    already = InvalidArgumentError("x")
    assert from_triton(already) is already


@pytest.mark.parametrize("reason", list(Reason), ids=[r.value for r in Reason])
def test_a_refusals_reason_is_read_from_its_message(reason):
    from tritonclient.utils import InferenceServerException

    message = refusal_message(reason, "what is wrong")
    for status, text in [("StatusCode.INVALID_ARGUMENT", message), (None, message),
                         (None, "in ensemble 'blip2', " + message)]:  # a streamed error: no status
        error = from_status(status, text)
        assert type(error) is InvalidArgumentError and error.reason is reason and error.message == text
    assert from_triton(InferenceServerException(message)).reason is reason


@pytest.mark.parametrize("status,message", [
    ("StatusCode.INVALID_ARGUMENT", "unexpected datatype TYPE_FP32 for inference input 'top_p'"),  # Triton's own
    (None, "invalid argument: prompt: 900 tokens; shorten the prompt"),  # an older server
    (None, "invalid argument [too_blue]: image: blue"),  # a newer server's code
])
def test_a_refusal_without_a_known_code_has_no_reason(status, message):
    error = from_status(status, message)
    assert type(error) is InvalidArgumentError and error.reason is None and not is_context_overflow(error)


def test_chat_drops_turns_by_the_reason_code_not_the_wording():
    """Turns go only when the server's reason is context_exceeded, whatever the message says."""
    from tritonclient.utils import InferenceServerException

    history = [(f"question {i}?", f"answer {i}") for i in range(4)]
    fits = len(chat_prompt(history[2:], "and now?"))

    async def chat(reason: Reason, wording: str):
        prompts = []

        async def generate(image, prompt, **controls):  # the server, refusing prompts longer than `fits`
            prompts.append(prompt)
            if len(prompt) > fits:
                raise from_triton(InferenceServerException(refusal_message(reason, wording)))
            return Result("it is red", [1, 2], prompt)

        async with AsyncBlip2Client("127.0.0.1:1") as client:
            client.generate = generate
            try:
                return await client.chat(b"png", history, "and now?"), prompts
            except InvalidArgumentError as e:
                return e, prompts

    # Wording no earlier client matched, under the context code: the two oldest turns go.
    result, prompts = asyncio.run(chat(Reason.CONTEXT_EXCEEDED, "needs 612 of the 512 slots"))
    assert result.dropped_turns == 2 and result.prompt == chat_prompt(history[2:], "and now?") == prompts[-1]
    assert len(prompts) == 3
    # The old wording under another code: refused as it is, no turn dropped.
    error, prompts = asyncio.run(chat(Reason.CONTROL, "prompt: 600 tokens; the model context is full; shorten the prompt"))
    assert isinstance(error, InvalidArgumentError) and error.reason is Reason.CONTROL
    assert prompts == [chat_prompt(history, "and now?")]




def test_a_full_server_is_resource_exhausted_whatever_the_status_it_came_with():
    """The Python backend sends "resource exhausted" as UNAVAILABLE; Triton's full stage queue as
    UNAVAILABLE too. Both are ResourceExhaustedError, which is an UnavailableError (retry later)."""
    for status in ("UNAVAILABLE", "INTERNAL", None):
        for message in ("resource exhausted: the KV cache is full", "Exceeds maximum queue size"):
            error = from_status(status, message)
            assert type(error) is ResourceExhaustedError and isinstance(error, UnavailableError)
