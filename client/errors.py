"""Typed client exceptions, mapped from gRPC status codes (or, on streams, from the message).

`from_status` is the one mapping; `from_triton` feeds it from whatever the transport raised
(tritonclient's InferenceServerException, a grpc.aio.AioRpcError, an in-stream error). A refusal's
reason code (blip2_triton.api.Reason) is read from its message, where the server puts it.
"""
from __future__ import annotations

from blip2_triton.api import Reason, is_resource_exhausted, is_unavailable, parse_refusal


class Blip2Error(Exception):
    """Base class: every error the client raises.

    `status` is the gRPC status name it was mapped from (e.g. "NOT_FOUND" for an
    UnavailableError), or the class's own status when the client raised it itself.
    """

    status = "UNKNOWN"

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class InvalidArgumentError(Blip2Error):
    """The request is wrong (bad image, prompt too long, out-of-range control); fix it and retry.

    `reason` says what, for programs to branch on (the message is for people): a Reason, or None
    when the refusal came without a code this client knows (Triton's own checks, an older server).
    """

    status = "INVALID_ARGUMENT"

    def __init__(self, message: str, status: str | None = None, reason: Reason | None = None):
        super().__init__(message, status)
        self.reason = reason


class UnavailableError(Blip2Error):
    """The server cannot be reached, is overloaded, or does not serve the model (yet), or a model
    process died under the request (the server brings it back within seconds); retry later.

    A stream that failed after its first response is never retried (its text was already handed
    out): `received_text` and `received_token_ids` are what it had delivered, and the message says
    how much that was. Both are empty when nothing was received.
    """

    status = "UNAVAILABLE"

    def __init__(self, message: str, status: str | None = None, received_text: str = "",
                 received_token_ids: list[int] | None = None):
        super().__init__(message, status)
        self.received_text = received_text
        self.received_token_ids = list(received_token_ids or [])


class ResourceExhaustedError(UnavailableError):
    """The server is full: too many requests wait, the request's KV cache would exceed the server's
    budget, or a stage's queue is full; the message says which. Retry later (an UnavailableError,
    so code that retries those retries these too)."""

    status = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(Blip2Error):
    """The request took longer than its timeout."""

    status = "DEADLINE_EXCEEDED"


class CancelledError(Blip2Error):
    """The request was cancelled."""

    status = "CANCELLED"


class ServerError(Blip2Error):
    """The server failed while handling a valid request."""

    status = "INTERNAL"


# gRPC status -> exception. Statuses not listed (INTERNAL, UNIMPLEMENTED, DATA_LOSS, ABORTED,
# PERMISSION_DENIED, ...) are ServerError; UNKNOWN is decided from the message (see below).
_BY_STATUS: dict[str, type[Blip2Error]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "OUT_OF_RANGE": InvalidArgumentError,
    "UNAVAILABLE": UnavailableError,
    "NOT_FOUND": UnavailableError,  # Triton: no such model, or no version of it loaded
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "CANCELLED": CancelledError,
}

# Streamed responses carry only a message, no status. The server's own models start their messages
# with "invalid argument [<reason>]: " (api.refusal_message), "unavailable: " (api.unavailable_message,
# read by from_status), "cancelled: " or "internal error: " (serving/triton_io.py); the other phrases
# are Triton's own request validation and model lookup.
_BY_PHRASE: tuple[tuple[str, type[Blip2Error]], ...] = (
    ("internal error: ", ServerError),
    ("cancelled: ", CancelledError),
    ("invalid argument", InvalidArgumentError),
    ("unknown model", UnavailableError),
    ("has no available versions", UnavailableError),
    ("is not ready", UnavailableError),
    ("unexpected datatype", InvalidArgumentError),
    ("unexpected shape", InvalidArgumentError),
    ("unexpected inference input", InvalidArgumentError),
    # Triton's words for a request with no inputs at all (blip2's are all optional: image + prompt,
    # the ensemble's query_embeds + prompt_ids, or a stop)
    ("request has 0 inputs", InvalidArgumentError),
    ("expected", InvalidArgumentError),
    ("expects", InvalidArgumentError),
    ("is not valid", InvalidArgumentError),
    ("missing", InvalidArgumentError),
    ("does not match", InvalidArgumentError),  # Triton: "input 'x' batch size does not match other inputs"
)


def status_name(status) -> str:
    """'StatusCode.INVALID_ARGUMENT' / grpc.StatusCode / None -> 'INVALID_ARGUMENT' / 'UNKNOWN'."""
    if status is None:
        return "UNKNOWN"
    name = getattr(status, "name", None) or str(status)
    return name.rsplit(".", 1)[-1].upper() or "UNKNOWN"


def from_status(status, message: str) -> Blip2Error:
    """One mapping from a status (may be unknown) and message to a typed exception.

    A full server (api.resource_exhausted_message, sent as UNAVAILABLE, or Triton's full queue) is
    ResourceExhaustedError. A model process that died, or a model being brought back, is unavailability: the server's own
    models say so (api.unavailable_message; UNKNOWN on a stream), while Triton reports a request
    sent to the dead process as INTERNAL (UNKNOWN on a stream) in its own words (api.TRITON_UNAVAILABLE).
    """
    name = status_name(status)
    if name in ("UNKNOWN", "INTERNAL", "UNAVAILABLE") and is_resource_exhausted(message):
        return ResourceExhaustedError(message, None if name == "UNKNOWN" else name)
    if name in ("UNKNOWN", "INTERNAL") and is_unavailable(message):
        return UnavailableError(message, None if name == "UNKNOWN" else name)
    if name in _BY_STATUS:
        return _typed(_BY_STATUS[name], message, name)
    if name == "UNKNOWN":
        lowered = message.lower()
        for phrase, cls in _BY_PHRASE:
            if phrase in lowered:
                return _typed(cls, message, None)
    return ServerError(message, name)


def _typed(cls: type[Blip2Error], message: str, status: str | None) -> Blip2Error:
    if cls is InvalidArgumentError:
        refusal = parse_refusal(message)
        return InvalidArgumentError(message, status, refusal.reason if refusal else None)
    return cls(message, status)


def from_triton(error: BaseException) -> Blip2Error:
    """What the transport raised -> a typed Blip2Error.

    Handles tritonclient's InferenceServerException (status() / message()), gRPC errors such as
    grpc.aio.AioRpcError (code() / details(): raised while iterating a stream, e.g. UNAVAILABLE
    when nothing listens at the URL) and, as UNKNOWN, anything else.
    """
    if isinstance(error, Blip2Error):
        return error
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    if callable(code) and callable(details):  # grpc.RpcError
        return from_status(code(), details() or str(error))
    status = getattr(error, "status", None)
    message = getattr(error, "message", None)
    status = status() if callable(status) else status
    message = message() if callable(message) else message
    return from_status(status, message or str(error))
