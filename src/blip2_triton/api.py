"""The served pipeline's tensors: the public `blip2` model API and the tensors between its stages,
the reason codes of the API's refusals with their wire format, and the wire format of
unavailability (a model's process died or is being brought back).

The repository generator, the Python-backend models and the client all read these names.
"""
from __future__ import annotations

import enum
import re
from typing import NamedTuple

from .pbtxt import ModelTensor

# The model clients call. It runs the stateless stages (preprocess, vision encoder, Q-Former) as
# separate, dynamically batched Triton models and owns the LLM decoder, its KV caches and the
# detokenizer itself (see model_repository/blip2/model.py).
PIPELINE = "blip2"
PREPROCESS = "preprocess"
# The same API as a Triton ensemble: preprocess -> vision_encoder -> qformer -> `blip2` as its
# generator step, fed the Q-Former's output and the prompt ids instead of an image and a prompt.
ENSEMBLE = "blip2_ensemble"

# ---- public inputs (per request; the model has a batch dimension, so clients send [1, ...]) ----
IMAGE = ModelTensor("image", "bytes", (1,))
PROMPT = ModelTensor("prompt", "bytes", (1,), optional=True)
STREAM = ModelTensor("stream", "bool", (1,), optional=True)

# Generation controls, named as transformers' generate() arguments. Absent = checkpoint default.
CONTROLS: tuple[ModelTensor, ...] = tuple(
    ModelTensor(name, dtype, (1,), optional=True)
    for name, dtype in (
        ("max_new_tokens", "int32"),
        ("min_new_tokens", "int32"),
        ("num_beams", "int32"),
        ("do_sample", "bool"),
        ("temperature", "float32"),
        ("top_k", "int32"),
        ("top_p", "float32"),
        ("repetition_penalty", "float32"),
        ("no_repeat_ngram_size", "int32"),
        ("length_penalty", "float32"),
        ("early_stopping", "bool"),
        ("seed", "int64"),
    )
)
CONTROL_NAMES = tuple(t.name for t in CONTROLS)

# ---- public outputs --------------------------------------------------------------------------
TEXT = ModelTensor("text", "bytes", (1,))  # the new text of this response (all of it when not streaming)
TOKEN_IDS = ModelTensor("token_ids", "int64", (-1,))  # the token ids of this response
FINAL = ModelTensor("final", "bool", (1,))  # true on the last response of a request
# the tokens the language model read: the image's query tokens and the tokenized prompt (usage counts)
PROMPT_TOKENS = ModelTensor("prompt_tokens", "int32", (1,))

PUBLIC_INPUTS: tuple[ModelTensor, ...] = (IMAGE, PROMPT, STREAM, *CONTROLS)

# `blip2` only: a request with `stop` true and no other input ends the generation `blip2` runs for
# the request of the same request id, and gets one empty final response. Through the ensemble the
# generator step carries the client's request id, and Triton 2.51 does not pass a client's
# cancellation on to a step that has started: the client sends this instead.
STOP = ModelTensor("stop", "bool", (1,), optional=True)
PUBLIC_OUTPUTS: tuple[ModelTensor, ...] = (TEXT, TOKEN_IDS, FINAL, PROMPT_TOKENS)

# ---- the retrieval models (a Blip2ForImageTextRetrieval checkpoint): one Triton model per call ----
EMBED_IMAGE = "embed_image"  # image -> image_embeds_proj [Q, D]: unit vectors, one per query
EMBED_TEXT = "embed_text"  # text -> text_embeds_proj [D]: a unit vector
MATCH = "match"  # image + text -> itm_probability, itc_similarity
RETRIEVAL_CALLS = (EMBED_IMAGE, EMBED_TEXT, MATCH)
RETRIEVAL_PREPROCESS = "retrieval_preprocess"  # the retrieval checkpoint's image processor (a `preprocess` model)

RETRIEVAL_TEXT = ModelTensor("text", "bytes", (1,))  # UTF-8 text, tokenized by the Q-Former's tokenizer
# softmax of the ITM logits, the "match" class (index 1), as transformers' docs compute it
ITM_PROBABILITY = ModelTensor("itm_probability", "float32", (1,))
# cosine similarity of the text's and the image's ITC embeddings, the max over the image's queries
ITC_SIMILARITY = ModelTensor("itc_similarity", "float32", (1,))

# ---- refusals (INVALID_ARGUMENT) ---------------------------------------------------------------
class Reason(str, enum.Enum):
    """Why a request was refused: sent with every refusal, so clients branch on it, never on wording."""

    INPUT = "input"  # a tensor is missing or has the wrong shape (Triton's own dtype checks send no code)
    IMAGE = "image"  # the image is empty, too large, or not a readable image file
    PROMPT = "prompt"  # the prompt is not valid UTF-8
    # The prompt (over the byte limit, or once tokenized), or the prompt plus max_new_tokens, does not
    # fit the language model's context: a shorter prompt or fewer new tokens may fit.
    CONTEXT_EXCEEDED = "context_exceeded"
    # A generation control is unknown, of the wrong type, out of range (num_beams: also this server's
    # bound) or contradicts another; or the checkpoint's generation config asks for what is not implemented.
    CONTROL = "control"
    # A retrieval text is empty, not valid UTF-8, or longer than the Q-Former's text positions.
    TEXT = "text"


class Refusal(NamedTuple):
    reason: Reason | None  # None: an older server's refusal, or a code this version does not know
    text: str  # what is wrong, for people


# Triton errors carry only a status and a message (a streamed one only the message), so the reason
# travels in the message: "invalid argument [context_exceeded]: prompt: 600 tokens; ...". Triton
# may put text before it ("in ensemble 'blip2', "). Older servers sent "invalid argument: ...".
_REFUSAL = re.compile(r"invalid argument(?: \[([a-z_]+)\])?: ")


def refusal_message(reason: Reason, text: str) -> str:
    """The message of a refusal, as the server sends it."""
    return f"invalid argument [{Reason(reason).value}]: {text}"


def parse_refusal(message: str) -> Refusal | None:
    """A refusal message -> its reason and text; None when the message is no refusal."""
    match = _REFUSAL.search(message)
    if match is None:
        return None
    try:
        reason = Reason(match.group(1)) if match.group(1) else None
    except ValueError:  # a newer server's code
        reason = None
    return Refusal(reason, message[match.end():])


# ---- unavailability (UNAVAILABLE) -------------------------------------------------------------
# A model the request needs cannot serve it now: its process died, or the server is bringing it
# back (server/supervisor.py). Nothing was wrong with the request; sent again a little later, it
# is served. Streamed errors carry only a message, so the status travels in its first words:
# "unavailable: model 'vision_encoder': Stub process 'vision_encoder_0_0' is not healthy."
UNAVAILABLE_PREFIX = "unavailable: "

# Triton's own words (not ours) for a model that cannot serve now: its process died ("Stub process
# 'blip2_0_0' is not healthy.", or "Failed to obtain the health mutex." when it died holding that
# lock, from the Python backend), or it is unloaded or loading again ("Model 'qformer' is not
# ready.", "Request for unknown model: 'blip2' has no available versions"), or the whole server is
# being stopped (the supervisor restarting it: "Server is stopping, ..."). A stage's failure
# reaches the served code in these words, mostly as INTERNAL, and a request to the `blip2` model
# itself reaches the client in them.
TRITON_UNAVAILABLE = re.compile(
    r"Stub process '[^']*' is not healthy|Failed to obtain the health mutex|Model '[^']*' is not ready"
    r"|unknown model: '[^']*' has no available versions"
    r"|Server is stopping, scheduler for model has stopped accepting new inference requests")


def unavailable_message(text: str) -> str:
    """The message of an UNAVAILABLE error, as the server sends it."""
    return UNAVAILABLE_PREFIX + text


def is_unavailable(message: str) -> bool:
    """Does this error message say that a model was unavailable (in our words, or in Triton's)?"""
    return message.startswith(UNAVAILABLE_PREFIX) or TRITON_UNAVAILABLE.search(message) is not None


# ---- overload (RESOURCE_EXHAUSTED) -------------------------------------------------------------
# The server is full: too many requests wait, a request's KV cache exceeds the server's budget, or a
# stage's queue is full (Triton: "Exceeds maximum queue size"). Triton's Python backend has no
# RESOURCE_EXHAUSTED code and streamed errors carry only a message, so the kind travels in the
# message's first words: "resource exhausted: 64 requests are waiting already (max_queue_size); retry later".
RESOURCE_EXHAUSTED_PREFIX = "resource exhausted: "
TRITON_RESOURCE_EXHAUSTED = re.compile(r"Exceeds maximum queue size")


def resource_exhausted_message(text: str) -> str:
    """The message of a RESOURCE_EXHAUSTED refusal, as the server sends it."""
    return RESOURCE_EXHAUSTED_PREFIX + text


def is_resource_exhausted(message: str) -> bool:
    """Does this error message say that the server was full (in our words, or in Triton's)?"""
    return message.startswith(RESOURCE_EXHAUSTED_PREFIX) or TRITON_RESOURCE_EXHAUSTED.search(message) is not None


# ---- between stages --------------------------------------------------------------------------
PROMPT_IDS = ModelTensor("prompt_ids", "int64", (-1,))  # BOS + prompt tokens, no image placeholders
