"""Python client for the served BLIP-2 models: caption, ask, chat, batch and stream over gRPC; match,
embed_image and embed_text against a retrieval checkpoint."""
from blip2_triton.api import Reason

from .aio import AsyncBlip2Client, Result
from .errors import (
    Blip2Error,
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServerError,
    UnavailableError,
)
from .prompts import chat_prompt, vqa_prompt
from .retrieval import Match
from .replicas import ReplicaStatus
from .sync import Blip2Client

__all__ = [
    "AsyncBlip2Client", "Blip2Client", "Result", "Blip2Error", "CancelledError", "DeadlineExceededError",
    "InvalidArgumentError", "Match", "Reason", "ReplicaStatus", "ResourceExhaustedError", "ServerError",
    "UnavailableError", "chat_prompt", "vqa_prompt",
]
