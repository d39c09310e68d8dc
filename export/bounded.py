"""Loading a BLIP-2 OPT checkpoint one submodule at a time, for the bounded-memory export.

The model is a shell on the meta device (no storage). Before a graph is traced, the submodules it
computes are loaded into the shell through transformers' own `from_pretrained` (the vision model
as a Blip2VisionModel, the Q-Former as a Blip2QFormerModel, the language model as an
OPTForCausalLM, each from the checkpoint's shards with its prefix mapped away; tensors of other
submodules are not read); after the graph, they go back to the meta device. The two top-level
tensors the Q-Former graph needs besides its submodule (query_tokens, language_projection) are read
from their shard directly. Peak memory is then the largest graph's submodule, not the model.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from blip2_triton import specs
from blip2_triton.serving.onnx_graph import release_free_heap

# What each graph computes, as attributes of Blip2ForConditionalGeneration.
SUBMODULES = {
    specs.VISION_ENCODER: ("vision_model",),
    specs.QFORMER: ("qformer", "query_tokens", "language_projection"),
    specs.LLM_DECODER: ("language_model",),
}


class SubmoduleLoader:
    """A meta-device Blip2ForConditionalGeneration whose submodules are loaded graph by graph."""

    def __init__(self, model: str | Path, float_dtype: str = "float32"):
        import torch
        from transformers import Blip2Config, Blip2ForConditionalGeneration, GenerationConfig

        from blip2_triton.families import family_of, is_retrieval

        if float_dtype != "float32":
            raise ValueError("--low-memory export is fp32 (with or without --quantize)")
        self.path = Path(model)
        if not self.path.is_dir():
            raise ValueError(f"--low-memory export reads a local checkpoint directory; {model!r} is not one")
        self.dtype = getattr(torch, float_dtype)
        self.float_dtype = float_dtype
        self.config = Blip2Config.from_pretrained(self.path)
        if is_retrieval(self.config) or family_of(self.config).name != "opt":
            raise ValueError("--low-memory export covers BLIP-2 OPT generation checkpoints")
        self.generation_config = GenerationConfig.from_pretrained(self.path)
        with torch.device("meta"):  # no storage: each graph's submodules are loaded into it in turn
            self.shell = Blip2ForConditionalGeneration(self.config)
        self.loaded: set[str] = set()

    def graph_names(self) -> list[str]:
        return [g.spec.name for g in self._graphs()]

    def _graphs(self):
        from .families import family_graphs

        return family_graphs(self.shell, self.float_dtype)

    @contextlib.contextmanager
    def graph(self, name: str):
        """The GraphExport `name` with its submodules loaded; they are released on exit."""
        parts = SUBMODULES[name]
        try:
            for part in parts:
                self._load(part)
            yield next(g for g in self._graphs() if g.spec.name == name)
        finally:
            for part in parts:
                self._release(part)

    def _load(self, part: str) -> None:
        import torch
        from transformers import Blip2QFormerModel, Blip2VisionModel, OPTForCausalLM
        from transformers.utils import logging as hf_logging

        kinds = {"vision_model": (Blip2VisionModel, self.config.vision_config),
                 "qformer": (Blip2QFormerModel, self.config.qformer_config),
                 "language_model": (OPTForCausalLM, self.config.text_config)}
        if part in kinds:
            cls, config = kinds[part]
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # every other submodule's tensors are "unexpected" here
            try:
                module = cls.from_pretrained(self.path, config=config, dtype=self.dtype, attn_implementation="eager",
                                             key_mapping={rf"^{part}\.": ""})
            finally:
                hf_logging.set_verbosity(verbosity)
            setattr(self.shell, part, module.eval())
            # Widening bf16 shards to fp32 frees a buffer per tensor; glibc keeps such pages
            # unless asked, and they would sit beside the next, larger submodule.
            release_free_heap()
        elif part == "query_tokens":
            self.shell.query_tokens = torch.nn.Parameter(self._tensor("query_tokens"), requires_grad=False)
        elif part == "language_projection":
            linear = torch.nn.Linear(*reversed(self.shell.language_projection.weight.shape))
            linear.weight = torch.nn.Parameter(self._tensor("language_projection.weight"), requires_grad=False)
            linear.bias = torch.nn.Parameter(self._tensor("language_projection.bias"), requires_grad=False)
            self.shell.language_projection = linear.eval()
        self.loaded.add(part)

    def _release(self, part: str) -> None:
        import torch

        value = getattr(self.shell, part)
        meta = value.to("meta")
        setattr(self.shell, part, torch.nn.Parameter(meta, requires_grad=False) if isinstance(value, torch.nn.Parameter) else meta)
        del value
        release_free_heap()
        self.loaded.discard(part)

    def _tensor(self, name: str):
        from safetensors import safe_open

        index = self.path / "model.safetensors.index.json"
        shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
        with safe_open(str(self.path / shard), "pt") as f:
            return f.get_tensor(name).to(self.dtype)
