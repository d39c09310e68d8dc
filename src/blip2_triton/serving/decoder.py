"""The LLM-decoder ONNX graph as a callable with explicit KV-cache arrays (names from its spec)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from blip2_triton import specs

from .onnx_graph import ORT_FLOATS, make_session


class DecoderGraph:
    """The graph's float dtype (fp32 or fp16) is read from the file itself, so no caller can get it wrong."""

    def __init__(self, path: str | Path, config, threads: int | None = None, providers: list[str] | None = None):
        self.session = make_session(path, threads, providers)
        prefix = next(i for i in self.session.get_inputs() if i.name == specs.PREFIX_EMBEDS)
        float_dtype = ORT_FLOATS[prefix.type]
        self.spec = specs.decoder_spec(config, float_dtype)
        self.layers = specs.num_decoder_layers(self.spec)
        past = self.spec.input(specs.past_key(0))
        self.heads, self.head_dim = past.dims[1], past.dims[3]
        self.float_dtype = np.dtype(float_dtype)
        self.embed_dim = self.spec.input(specs.PREFIX_EMBEDS).dims[2]
        self._past_names = [n for i in range(self.layers) for n in (specs.past_key(i), specs.past_value(i))]
        self._outputs = self.spec.output_names

    def empty_past(self, rows: int) -> list[np.ndarray]:
        """Per layer key and value (2 * layers arrays) of length 0, [rows, heads, 0, head_dim]."""
        shape = (rows, self.heads, 0, self.head_dim)
        return [np.zeros(shape, self.float_dtype) for _ in range(2 * self.layers)]

    def __call__(self, input_ids: np.ndarray, prefix_embeds: np.ndarray | None, attention_mask: np.ndarray,
                 past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """-> (logits [rows, vocab] float32 for the last position, present (2 * layers arrays))."""
        rows = input_ids.shape[0]
        if prefix_embeds is None:
            prefix_embeds = np.zeros((rows, 0, self.embed_dim), self.float_dtype)
        feed = {
            specs.INPUT_IDS: input_ids.astype(np.int64, copy=False),
            specs.PREFIX_EMBEDS: prefix_embeds.astype(self.float_dtype, copy=False),
            specs.ATTENTION_MASK: attention_mask.astype(np.int64, copy=False),
        }
        feed.update(zip(self._past_names, past))
        logits, *present = self.session.run(self._outputs, feed)
        return logits[:, -1, :], present
