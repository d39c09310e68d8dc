"""Error types the serving code raises; the Triton adapter maps them to status codes."""


class InvalidInput(ValueError):
    """The client's request is wrong (bad image, prompt too long, bad control): INVALID_ARGUMENT.

    The message is sent to the client as it is, so it names the input and what is allowed.
    """


class Cancelled(Exception):
    """The client cancelled or went away; the sequence's slot is freed."""
