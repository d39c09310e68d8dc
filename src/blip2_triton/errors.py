"""Every error type of the project's core, in one module that any layer may import.

The Triton adapter (serving.triton_io) maps them to status codes; the CLI prints them.
"""
from __future__ import annotations

from .api import Reason


class InvalidInput(ValueError):
    """The client's request is wrong (bad image, prompt too long, bad control): INVALID_ARGUMENT.

    The message is sent to the client as it is, so it names the input and what is allowed;
    `reason` (api.Reason) goes with it, for programs. Subclasses set their own default.
    """

    reason: Reason = Reason.INPUT

    def __init__(self, message: str, reason: Reason | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = Reason(reason)


class Cancelled(Exception):
    """The client cancelled or went away; the sequence's slot is freed."""


class Unavailable(Exception):
    """A model the request needs cannot serve it now (its process died, or it is being brought
    back): UNAVAILABLE. Not the request's fault; the same request succeeds once the model is back."""


class ResourceExhausted(Exception):
    """The server is full: the request would exceed a bound (waiting requests, the KV cache's byte
    budget, a stage's queue): RESOURCE_EXHAUSTED. Sent again later, when load is lower, it is served;
    the message says which bound."""


class UnsupportedModelError(ValueError):
    """The checkpoint's language model has no registered family (yet)."""
