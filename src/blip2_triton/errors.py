"""Every error type of the project's core, in one module that any layer may import.

The Triton adapter (serving.triton_io) maps them to status codes; the CLI prints them.
"""


class InvalidInput(ValueError):
    """The client's request is wrong (bad image, prompt too long, bad control): INVALID_ARGUMENT.

    The message is sent to the client as it is, so it names the input and what is allowed.
    """


class Cancelled(Exception):
    """The client cancelled or went away; the sequence's slot is freed."""


class UnsupportedModelError(ValueError):
    """The checkpoint's language model has no registered family (yet)."""
