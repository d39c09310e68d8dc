"""`export --low-memory` (export/bounded.py, export/streaming.py): the same graphs as the whole-model
exporter, one submodule in memory at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from blip2_triton import repository
from blip2_triton.export import bounded
from blip2_triton.export.exporter import export_checkpoint
from blip2_triton.export.families import family_graphs
from blip2_triton.export.validate import _attended
from blip2_triton.serving.onnx_graph import make_session

# Both exports run the same weights through the same ops; only kernel order (fp32) and, for the
# quantized graphs, onnxruntime's fused int8 op against the MatMulInteger pattern it fuses differ.
TOLERANCE = {None: 1e-5, "int8": 1e-5, "int4": 1e-5}


def _cases(checkpoint):
    """Every graph's gate inputs (the validation shapes), from the whole model."""
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()
    return {g.spec.name: (g.spec, [g.sample(axes, seed=7 + i) for i, axes in enumerate(g.validation_axes)])
            for g in family_graphs(model)}


def _assert_same_graphs(repo_a, repo_b, cases, tolerance):
    for name, (spec, samples) in cases.items():
        a = make_session(repository.graph_path(repo_a, name))
        b = make_session(repository.graph_path(repo_b, name))
        for sample in samples:
            feed = {k: v.numpy() for k, v in sample.items()}
            for out, x, y in zip(spec.outputs, a.run(spec.output_names, dict(feed)), b.run(spec.output_names, dict(feed))):
                x, y = _attended(out, feed, x.astype(np.float32)), _attended(out, feed, y.astype(np.float32))
                diff = float(np.max(np.abs(x - y)))
                assert diff <= tolerance * (1 + float(np.max(np.abs(x)))), (name, out.name, diff)


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-opt-proj", "tiny-opt-postln"])
def test_low_memory_graphs_equal_the_whole_model_exports(preset, exported, tmp_path):
    checkpoint, whole, _ = exported(preset)
    report = export_checkpoint(checkpoint, tmp_path / "repo", low_memory=True, progress=False)
    assert report.validated and max(report.max_abs_diff.values()) < 1e-4
    _assert_same_graphs(whole, tmp_path / "repo", _cases(checkpoint), TOLERANCE[None])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_low_memory_quantized_graphs_equal_the_whole_model_exports(quantize, tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints("tiny-opt")
    export_checkpoint(checkpoint, tmp_path / "whole", quantize=quantize, progress=False)
    report = export_checkpoint(checkpoint, tmp_path / "low", quantize=quantize, low_memory=True, progress=False)
    assert f"llm_decoder[{quantize}]" in report.max_abs_diff  # the quantized graphs went through the gate
    _assert_same_graphs(tmp_path / "whole", tmp_path / "low", _cases(checkpoint), TOLERANCE[quantize])


def test_low_memory_export_holds_one_submodule_at_a_time(tiny_checkpoints, tmp_path, monkeypatch):
    """At every load, the only submodules with storage are those of the graph being exported."""
    checkpoint = tiny_checkpoints("tiny-opt")
    seen = []
    load = bounded.SubmoduleLoader._load

    def spy(self, part):
        load(self, part)
        resident = {p for parts in bounded.SUBMODULES.values() for p in parts
                    if any(not t.is_meta for t in _tensors(getattr(self.shell, p)))}
        seen.append((part, resident))

    monkeypatch.setattr(bounded.SubmoduleLoader, "_load", spy)
    export_checkpoint(checkpoint, tmp_path / "repo", low_memory=True, progress=False, validate=False)
    assert [p for p, _ in seen] == [p for parts in bounded.SUBMODULES.values() for p in parts]
    for part, resident in seen:
        group = next(parts for parts in bounded.SUBMODULES.values() if part in parts)
        assert part in resident and resident <= set(group), (part, resident)


def _tensors(value):
    return [value] if isinstance(value, torch.Tensor) else list(value.parameters())


def test_low_memory_refuses_what_it_cannot_do(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="OPT"):
        export_checkpoint(tiny_checkpoints("tiny-t5"), tmp_path / "t5", low_memory=True, progress=False)
    with pytest.raises(ValueError, match="fp32"):
        export_checkpoint(tiny_checkpoints("tiny-opt"), tmp_path / "fp16", dtype="fp16", low_memory=True, progress=False)


def test_low_memory_export_of_bfloat16_shards(tmp_path):
    """A checkpoint stored in bf16 (as the opt-2.7b-size run keeps it): each submodule is loaded as
    stored and widened to fp32 tensor by tensor; the graphs pass the gate against transformers'
    own fp32 load of the same checkpoint, and the tied LM head stays tied."""
    from transformers import Blip2ForConditionalGeneration

    from blip2_triton.toy.sharded import build_sharded_checkpoint

    checkpoint = build_sharded_checkpoint(tmp_path / "bf16", "tiny-opt", dtype="bfloat16", shard_bytes=40_000,
                                          progress=False)
    loader = bounded.SubmoduleLoader(checkpoint)
    reference = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    with loader.graph("llm_decoder"):
        lm = loader.shell.language_model
        assert all(p.dtype == torch.float32 for p in lm.parameters())
        assert lm.lm_head.weight is lm.get_input_embeddings().weight
        for (name, p), q in zip(lm.state_dict().items(), reference.language_model.state_dict().values()):
            assert torch.equal(p, q), name
    report = export_checkpoint(checkpoint, tmp_path / "repo", low_memory=True, progress=False)
    assert max(report.max_abs_diff.values()) < 1e-4
