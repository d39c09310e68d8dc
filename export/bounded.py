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
            stored = self._stored_dtype(part)
            # A checkpoint stored narrower than the export (bf16 shards, fp32 graphs): transformers
            # widens every tensor while it keeps all shards memory-mapped, so the narrow bytes it
            # read stay resident beside the wide model until it returns (1.5x the submodule).
            # Loaded as stored, the tensors are the mapped file itself; widened one at a time
            # below, each one's mapped pages are dropped as soon as it is copied.
            narrow = stored.itemsize < self.dtype.itemsize
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # every other submodule's tensors are "unexpected" here
            try:
                module = cls.from_pretrained(self.path, config=config, dtype=stored if narrow else self.dtype,
                                             attn_implementation="eager", key_mapping={rf"^{part}\.": ""})
            finally:
                hf_logging.set_verbosity(verbosity)
            if narrow:
                _widen(module, self.dtype)
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

    def _stored_dtype(self, part: str):
        """The dtype `part`'s tensors are stored in (its first tensor's, from the shard header)."""
        import torch
        from safetensors import safe_open

        index = self.path / "model.safetensors.index.json"
        weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
        shard = weight_map[next(k for k in weight_map if k.startswith(part + "."))] if weight_map else "model.safetensors"
        with safe_open(str(self.path / shard), "pt") as f:
            name = next(k for k in f.keys() if k.startswith(part + "."))
            stored = f.get_slice(name).get_dtype()
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, self.dtype)

    def _tensor(self, name: str):
        from safetensors import safe_open

        index = self.path / "model.safetensors.index.json"
        shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
        with safe_open(str(self.path / shard), "pt") as f:
            return f.get_tensor(name).to(self.dtype)


def _widen(module, dtype) -> None:
    """Every floating tensor of `module` to `dtype`, one at a time, dropping each narrow tensor's
    resident pages once copied (tied tensors stay tied)."""
    import torch

    done: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if id(param) not in done:
                if not param.is_floating_point() or param.dtype == dtype:
                    done[id(param)] = param
                else:
                    wide = torch.nn.Parameter(param.detach().to(dtype), requires_grad=False)
                    _drop_pages(param)
                    done[id(param)] = wide
            setattr(sub, name, done[id(param)])
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer.is_floating_point() and buffer.dtype != dtype:
                sub._buffers[name] = buffer.to(dtype)


def _drop_pages(tensor) -> None:
    """madvise(MADV_DONTNEED) the whole pages of a tensor no one will read again: for a tensor that
    is a memory-mapped file (how from_pretrained loads tensors kept in their stored dtype) this gives
    its resident pages back now rather than when the whole shard is unmapped."""
    import ctypes
    import mmap

    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
