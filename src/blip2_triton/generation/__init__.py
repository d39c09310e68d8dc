"""numpy decoding logic that reproduces transformers' `generate()` token for token.

No torch at import or run time: the generator process feeds each step's logits from the ONNX
decoder and gets back the next tokens and the KV-cache rows to keep (see `search`).
"""
from blip2_triton.generation.logits import process_scores
from blip2_triton.generation.params import GenerationParams, InvalidGenerationParams
from blip2_triton.generation.search import (
    BatchStep,
    BeamSearch,
    GreedyOrSample,
    Search,
    StepResult,
    make_search,
    pad_outputs,
    step_batch,
)

__all__ = [
    "BatchStep",
    "BeamSearch",
    "GenerationParams",
    "GreedyOrSample",
    "InvalidGenerationParams",
    "Search",
    "StepResult",
    "make_search",
    "pad_outputs",
    "process_scores",
    "step_batch",
]
