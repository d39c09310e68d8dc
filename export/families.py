"""Each language-model family's graph builder: what the exporter traces for a BLIP-2 checkpoint.

The family registry itself (names, graph specs) is core data in `blip2_triton.families`; this
layer adds only the torch side, keyed by the same family name. A builder takes the loaded
Blip2ForConditionalGeneration and its float dtype and returns its GraphExports in spec order.
"""
from __future__ import annotations

from typing import Callable

from blip2_triton.families import family_of, is_retrieval

from .graphs import opt_graphs
from .retrieval import retrieval_graphs
from .t5 import t5_graphs

BUILDERS: dict[str, Callable[[object, str], list]] = {
    "opt": opt_graphs,
    "t5": t5_graphs,
}


def family_graphs(model, float_dtype: str = "float32") -> list:
    """The GraphExports (spec, torch module, input sampler) of a loaded Blip2ForConditionalGeneration
    (UnsupportedModelError for a language model with no family) or Blip2ForImageTextRetrieval."""
    if is_retrieval(model.config):
        return retrieval_graphs(model, float_dtype)
    return BUILDERS[family_of(model.config).name](model, float_dtype)
