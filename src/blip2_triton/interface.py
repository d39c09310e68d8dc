"""The served pipeline's tensors: the public `blip2` ensemble API and the tensors between its steps.

The repository generator, the Python-backend models and the client all read these names.
"""
from __future__ import annotations

from .pbtxt import Tensor

ENSEMBLE = "blip2"
PREPROCESS = "preprocess"
GENERATOR = "generator"
POSTPROCESS = "postprocess"

# ---- public inputs (per request; the ensemble batches, so clients send shape [1, ...]) ---------
IMAGE = Tensor("image", "bytes", (1,))
PROMPT = Tensor("prompt", "bytes", (1,), optional=True)
STREAM = Tensor("stream", "bool", (1,), optional=True)

# Generation controls, named as transformers' generate() arguments. Absent = checkpoint default.
CONTROLS: tuple[Tensor, ...] = tuple(
    Tensor(name, dtype, (1,), optional=True)
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
TEXT = Tensor("text", "bytes", (1,))  # the new text of this response (all of it when not streaming)
TOKEN_IDS = Tensor("token_ids", "int64", (-1,))  # the token ids of this response
FINAL = Tensor("final", "bool", (1,))  # true on the last response of a request

# ---- between steps ---------------------------------------------------------------------------
PROMPT_IDS = Tensor("prompt_ids", "int64", (-1,))  # BOS + prompt tokens, no image placeholders
GENERATED_IDS = Tensor("generated_ids", "int64", (-1,))  # every token generated so far
NEW_TOKENS = Tensor("new_token_count", "int32", (1,))  # how many of them are new in this response
LAST = Tensor("last_response", "bool", (1,))  # the generator's last response for the request
