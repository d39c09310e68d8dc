"""Typed client exceptions, mapped from gRPC status codes (or, on streams, from the message)."""
from __future__ import annotations


class Blip2Error(Exception):
    """Base class: every error the client raises. `status` is the gRPC status name when known."""

    status = "UNKNOWN"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgumentError(Blip2Error):
    """The request is wrong (bad image, prompt too long, out-of-range control); fix it and retry."""

    status = "INVALID_ARGUMENT"


class UnavailableError(Blip2Error):
    """The server cannot be reached or is not ready."""

    status = "UNAVAILABLE"


class DeadlineExceededError(Blip2Error):
    """The request took longer than its timeout."""

    status = "DEADLINE_EXCEEDED"


class CancelledError(Blip2Error):
    """The request was cancelled."""

    status = "CANCELLED"


class ServerError(Blip2Error):
    """The server failed while handling a valid request."""

    status = "INTERNAL"


_BY_STATUS = {cls.status: cls for cls in (InvalidArgumentError, UnavailableError, DeadlineExceededError, CancelledError)}
# Streamed responses carry only a message, no status: Triton's own validation messages and our
# models' messages are recognised by these phrases.
# The server's own models start messages with "invalid argument: "; the rest are Triton's.
_INVALID_PHRASES = (
    "invalid argument: ", "unexpected datatype", "unexpected shape", "unexpected inference input",
    "expected", "expects", "is not valid", "missing",
)


def status_name(status) -> str:
    """'StatusCode.INVALID_ARGUMENT' / grpc.StatusCode / None -> 'INVALID_ARGUMENT' / 'UNKNOWN'."""
    if status is None:
        return "UNKNOWN"
    name = getattr(status, "name", None) or str(status)
    return name.rsplit(".", 1)[-1].upper()


def from_status(status, message: str) -> Blip2Error:
    """One mapping from a status (may be unknown) and message to a typed exception."""
    name = status_name(status)
    if name in _BY_STATUS:
        return _BY_STATUS[name](message)
    if name == "UNKNOWN":
        lowered = message.lower()
        if "internal error: " in lowered:
            return ServerError(message)
        if "cancelled: " in lowered:
            return CancelledError(message)
        if any(p in lowered for p in _INVALID_PHRASES):
            return InvalidArgumentError(message)
    return ServerError(message)


def from_triton(error) -> Blip2Error:
    """tritonclient's InferenceServerException (or any exception) -> a typed Blip2Error."""
    if isinstance(error, Blip2Error):
        return error
    status = getattr(error, "status", lambda: None)()
    message = getattr(error, "message", lambda: str(error))() or str(error)
    return from_status(status, message)
