"""Python client for the served BLIP-2 model: caption, ask, chat, batch and stream over gRPC."""
from blip2_triton.api import Reason

from .aio import AsyncBlip2Client, Result
from .errors import (
    Blip2Error,
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    ServerError,
    UnavailableError,
)
from .prompts import chat_prompt, vqa_prompt
from .sync import Blip2Client

__all__ = [
    "AsyncBlip2Client", "Blip2Client", "Result", "Blip2Error", "CancelledError", "DeadlineExceededError",
    "InvalidArgumentError", "Reason", "ServerError", "UnavailableError", "chat_prompt", "vqa_prompt",
]
