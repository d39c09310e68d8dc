"""OpenAI chat completions <-> one `blip2` request: validation and response bodies, no I/O.

`parse(body, ...)` turns a `POST /v1/chat/completions` body into a `ChatJob` (the image, BLIP-2's
chat prompt, the generation controls) or raises `OpenAIError`, a 4xx in OpenAI's error shape. The
rest builds OpenAI's response objects from the model's answer.

What maps where:
- messages: user and assistant turns, alternating, ending on a user turn, with exactly one image
  (an `image_url` part) in the user turns. Earlier turns become BLIP-2's chat prompt as the
  client's `chat` builds it (`Question: q1 Answer: a1. Question: q2 Answer:`); a single user turn
  with no text is captioning (empty prompt). System and tool messages are refused.
- image_url: `data:` URLs with base64 content; http(s) URLs only when the front door was started
  with remote images allowed (the app fetches them).
- max_tokens / max_completion_tokens -> max_new_tokens; temperature 0 -> greedy, > 0 -> sampling
  at that temperature; top_p -> sampling with nucleus top_p; seed -> seed. Absent ones take the
  checkpoint's generation config (greedy for BLIP-2 checkpoints), not OpenAI's temperature 1.
- n must be 1; stream and stream_options.include_usage are honoured.
Anything else OpenAI defines (tools, logprobs, stop, penalties, response formats, audio, ...) is
refused with a 400 naming the parameter, rather than silently ignored.
"""
from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from blip2_triton.api import Reason
from blip2_triton.client.prompts import chat_prompt

# Accepted and ignored: bookkeeping that does not change the answer.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
# OpenAI parameters this model cannot honour, each with its harmless value (None: none is).
UNSUPPORTED_UNLESS = {
    "tools": [], "tool_choice": "none", "functions": [], "function_call": "none", "logprobs": False,
    "top_logprobs": 0, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0, "stop": None,
    "response_format": {"type": "text"}, "audio": None, "modalities": ["text"], "prediction": None,
    "web_search_options": None, "reasoning_effort": None,
}
SUPPORTED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                       "seed", "n", "stream", "stream_options"})
# A refusal's reason (api.Reason) -> OpenAI's error code.
CODES = {Reason.CONTEXT_EXCEEDED: "context_length_exceeded", Reason.IMAGE: "invalid_image",
         Reason.CONTROL: "invalid_value", Reason.PROMPT: "invalid_value", Reason.INPUT: "invalid_value"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatJob:
    """One chat completion as one `blip2` request: `image` is bytes, or an http(s) URL still to fetch."""

    model: str
    image: bytes | str
    prompt: str
    controls: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def parse(body: Any, served_model: str, allow_remote_images: bool = False) -> ChatJob:
    """A request body (parsed JSON) -> ChatJob; OpenAIError (400, or 404 for another model)."""
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    for name, value in body.items():
        if name in SUPPORTED or name in IGNORED:
            continue
        if name in UNSUPPORTED_UNLESS:
            if value is None or value == UNSUPPORTED_UNLESS[name]:
                continue
            raise OpenAIError(f"'{name}' is not supported by this model (BLIP-2 answers in plain text)", name,
                              "unsupported_parameter")
        raise OpenAIError(f"Unrecognized request argument supplied: {name}", name, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError("'model' is required: a string", "model", "missing_required_parameter")
    if model != served_model:
        raise OpenAIError(f"The model '{model}' does not exist; this server serves '{served_model}'", "model",
                          "model_not_found", status=404)
    image, history, question = _conversation(body.get("messages"), allow_remote_images)
    n = body.get("n")
    if n is not None and n != 1:
        raise OpenAIError(f"'n' must be 1 (one choice per request), got {n!r}", "n", "unsupported_value")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise OpenAIError(f"'stream' must be a boolean, got {stream!r}", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)
                                or set(options) - {"include_usage"}):
        raise OpenAIError("'stream_options' is an object {\"include_usage\": bool}, only with 'stream': true",
                          "stream_options", "invalid_value")
    prompt = chat_prompt(history, question) if (history or question) else ""
    return ChatJob(model, image, prompt, _controls(body), bool(stream), bool((options or {}).get("include_usage")))


def _conversation(messages: Any, allow_remote: bool) -> tuple[bytes | str, list[tuple[str, str]], str]:
    """messages -> (the image, earlier (question, answer) turns, the last question)."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("'messages' must be a non-empty array", "messages", "invalid_value")
    images, turns = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIError(f"{where} must be an object", where, "invalid_type")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise OpenAIError(f"{where}: role {role!r} is not supported: BLIP-2 takes user and assistant turns "
                              "(no system prompt, no tools)", f"{where}.role", "unsupported_value")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise OpenAIError(f"{where}: expected a {expected} message: turns alternate, starting with the user",
                              f"{where}.role", "invalid_value")
        turns.append(_text(message.get("content"), f"{where}.content", images if role == "user" else None,
                           allow_remote))
    if len(turns) % 2 == 0:
        raise OpenAIError("the last message must be the user's", f"messages[{len(turns) - 1}].role", "invalid_value")
    if len(images) != 1:
        raise OpenAIError(f"exactly one image is needed (an image_url part in a user message), got {len(images)}",
                          "messages", "invalid_value")
    history = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
    return images[0], history, turns[-1]


def _text(content: Any, where: str, images: list | None, allow_remote: bool) -> str:
    """A message's text (its text parts joined by spaces); image parts are appended to `images`
    (None: this role may not carry images)."""
    if isinstance(content, str):
        return content.strip()
    if not isinstance(content, list):
        raise OpenAIError(f"{where} must be a string or an array of content parts", where, "invalid_type")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"].strip())
        elif kind == "image_url" and images is not None:
            url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str):
                raise OpenAIError(f"{at}.image_url.url must be a string", f"{at}.image_url.url", "invalid_type")
            images.append(image_source(url, f"{at}.image_url.url", allow_remote))
        else:
            raise OpenAIError(f"{at}: content part type {kind!r} is not supported here (text parts; image_url "
                              "parts in user messages)", at, "unsupported_value")
    return " ".join(t for t in texts if t)


def image_source(url: str, param: str, allow_remote: bool) -> bytes | str:
    """A data: URL -> its bytes; an http(s) URL -> itself (fetched later) when allowed."""
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise OpenAIError("image data URLs must be base64: data:image/<format>;base64,<data>", param,
                              "invalid_image_url")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise OpenAIError("the image data URL's base64 is invalid", param, "invalid_image_url") from None
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise OpenAIError("image URLs over http(s) are refused by this server (start it with "
                              "--allow-remote-images to fetch them); send the image as a base64 data: URL",
                              param, "invalid_image_url")
        return url
    raise OpenAIError("an image URL must be a base64 data: URL (or http(s) where allowed)", param,
                      "invalid_image_url")


def _controls(body: dict) -> dict[str, Any]:
    controls: dict[str, Any] = {}
    limits = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    if len(set(map(repr, limits.values()))) > 1:
        raise OpenAIError("'max_tokens' and 'max_completion_tokens' disagree; give one", "max_tokens",
                          "invalid_value")
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OpenAIError(f"'{name}' must be an integer >= 1, got {value!r}", name, "invalid_value")
        controls["max_new_tokens"] = value
    temperature, top_p, seed = body.get("temperature"), body.get("top_p"), body.get("seed")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise OpenAIError(f"'temperature' must be a number in [0, 2], got {temperature!r}", "temperature",
                              "invalid_value")
        if temperature == 0:
            controls["do_sample"] = False
        else:
            controls.update(do_sample=True, temperature=float(temperature))
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise OpenAIError(f"'top_p' must be a number in (0, 1], got {top_p!r}", "top_p", "invalid_value")
        if controls.get("do_sample") is not False:
            controls.update(do_sample=True, top_p=float(top_p))
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise OpenAIError(f"'seed' must be an integer, got {seed!r}", "seed", "invalid_type")
        controls["seed"] = seed
    return controls


# ---- responses ------------------------------------------------------------------------------------
def finish_reason(job: ChatJob, completion_tokens: int) -> str:
    """"length" when the request's max_tokens ran out, else "stop" (the front door does not know the
    checkpoint's own default limit, so a cut at that limit reads "stop")."""
    limit = job.controls.get("max_new_tokens")
    return "length" if limit is not None and completion_tokens >= limit else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(job: ChatJob, text: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The `chat.completion` object of a whole answer."""
    return {
        "id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "finish_reason": finish_reason(job, completion_tokens), "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None,
    }


def chunk(job: ChatJob, delta: dict, finish: str | None = None, usage_counts: dict | None = None,
          choices: bool = True) -> dict:
    """One `chat.completion.chunk` of a streamed answer (`choices=False`: the usage chunk)."""
    body = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else [],
            "system_fingerprint": None}
    if usage_counts is not None or job.include_usage:
        body["usage"] = usage_counts
    return body


def models(served_model: str, created: int) -> dict:
    """GET /v1/models."""
    return {"object": "list", "data": [model(served_model, created)]}


def model(served_model: str, created: int) -> dict:
    return {"id": served_model, "object": "model", "created": created, "owned_by": "blip2-triton"}
