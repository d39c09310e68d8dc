"""The served pipeline's tensors: the public `blip2` model API and the tensors between its stages.

The repository generator, the Python-backend models and the client all read these names.
"""
from __future__ import annotations

from .pbtxt import Tensor

# The model clients call. It runs the stateless stages (preprocess, vision encoder, Q-Former) as
# separate, dynamically batched Triton models and owns the LLM decoder, its KV caches and the
# detokenizer itself (see model_repository/blip2/model.py).
PIPELINE = "blip2"
PREPROCESS = "preprocess"

# ---- public inputs (per request; the model has a batch dimension, so clients send [1, ...]) ----
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

PUBLIC_INPUTS: tuple[Tensor, ...] = (IMAGE, PROMPT, STREAM, *CONTROLS)
PUBLIC_OUTPUTS: tuple[Tensor, ...] = (TEXT, TOKEN_IDS, FINAL)

# ---- between stages --------------------------------------------------------------------------
PROMPT_IDS = Tensor("prompt_ids", "int64", (-1,))  # BOS + prompt tokens, no image placeholders
