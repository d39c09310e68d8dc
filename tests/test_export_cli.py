"""`blip2-triton export` end to end: progress, --no-validate, a failing gate, and checkpoints it must refuse.

The failing gate is a real numerical mismatch: a graph builder registered the supported way
(export.families.BUILDERS) whose vision module reads the batch size as a Python number, a bug
class tracing freezes. The graph traced at batch 2 then disagrees with PyTorch at batch 3.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
from torch import nn

from blip2_triton import repository, specs
from blip2_triton.export.families import BUILDERS

ROOT = Path(__file__).resolve().parent.parent


class BatchFrozenVision(nn.Module):
    """The vision encoder, doubled for batches over 2: a Python branch on a shape, frozen by tracing."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values):
        out = self.inner(pixel_values)
        return out * 2.0 if pixel_values.shape[0] > 2 else out


def frozen_branch_graphs(model, float_dtype):
    from blip2_triton.export.graphs import opt_graphs

    graphs = opt_graphs(model, float_dtype)
    graphs[0] = dataclasses.replace(graphs[0], module=BatchFrozenVision(graphs[0].module))
    return graphs



def run_cli(*args, register_frozen: bool = False) -> subprocess.CompletedProcess:
    """`blip2-triton ...` in a fresh interpreter, optionally with the diverging OPT builder registered."""
    code = "import sys\n"
    if register_frozen:
        code += (f"from blip2_triton.export.families import BUILDERS\nfrom {__name__} import frozen_branch_graphs\n"
                 "BUILDERS['opt'] = frozen_branch_graphs\n")
    code += "from blip2_triton.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def graph_names() -> list[str]:
    return [specs.VISION_ENCODER, specs.QFORMER, specs.LLM_DECODER]


def test_export_cli_shows_each_step_and_replaces_an_old_layout(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("tiny-opt-postln")
    out = tmp_path / "repo"
    (out / "generator").mkdir(parents=True)  # a model of an older layout: Triton would fail to load it
    (out / "generator" / "config.pbtxt").write_text('name: "generator"')
    (out / "NOTES.txt").write_text("mine")  # not a model: stays
    result = run_cli("export", "--model", ckpt, "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "llm_decoder" in result.stdout and "max |onnx - torch|" in result.stdout

    # Progress: plain lines (stderr is a pipe here, not a TTY), loading and every sub-step of every graph.
    lines = result.stderr.splitlines()
    assert any("export: loading" in line for line in lines)
    names = graph_names()
    for n, graph in enumerate(names, 1):
        steps = [line.split(f"[{n}/{len(names)}] {graph}: ", 1)[1] for line in lines if f"[{n}/{len(names)}] {graph}: " in line]
        assert [s.split(" (")[0].split(",")[0] for s in steps[:-1]] == [
            "trace + export", "write weights", "fold reshape shapes", "PyTorch reference outputs", "written",
            "validate in onnxruntime against PyTorch"], steps
        assert steps[-1].startswith("max |onnx - torch|"), steps
    assert any("PyTorch model released" in line for line in lines)
    assert "\r" not in result.stderr

    assert sorted(c.parent.name for c in out.glob("*/config.pbtxt")) == [
        "blip2", "blip2_ensemble", "preprocess", "qformer", "vision_encoder"]
    assert (out / "NOTES.txt").read_text() == "mine"
    version = out / "blip2" / "1"
    assert (version / "llm_decoder.onnx").exists() and (version / "model.py").exists()
    assert (version / "checkpoint" / "config.json").exists() and (version / "checkpoint" / "export_report.json").exists()
    assert not list(tmp_path.glob(".repo.*")), "staging directories left behind"


def test_no_validate_exports_unchecked_graphs_and_says_so(tiny_checkpoints, tmp_path):
    out = tmp_path / "repo"
    result = run_cli("export", "--model", tiny_checkpoints("tiny-opt"), "--output", out, "--no-validate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not validated" in result.stdout
    assert "PyTorch reference outputs" not in result.stderr and "validate in onnxruntime" not in result.stderr
    report = json.loads((repository.assets_dir(out) / "export_report.json").read_text())
    assert report["validated"] is False and report["checks"] == [] and report["max_abs_diff"] == {}
    assert set(report["graphs"]) == set(graph_names())
    for graph in graph_names():
        session = ort.InferenceSession(str(repository.graph_path(out, graph)), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()][0] in (specs.IMAGE_EMBEDS, specs.QUERY_EMBEDS, specs.LOGITS)
    assert len(list(out.glob("*/config.pbtxt"))) == 5


def test_failing_gate_leaves_the_repository_alone(exported, monkeypatch, tmp_path):
    """A real mismatch: output keeps the earlier good export byte for byte; the attempt's graphs and
    report are kept beside it with no config.pbtxt, so no server loads them."""
    from blip2_triton.export.exporter import export_checkpoint, failed_dir
    from blip2_triton.export.validate import ValidationError

    ckpt, good, _ = exported("tiny-opt")
    out = tmp_path / "repo"
    shutil.copytree(good, out)
    before = digest(out)
    monkeypatch.setitem(BUILDERS, "opt", frozen_branch_graphs)
    with pytest.raises(ValidationError) as failure:
        export_checkpoint(ckpt, out, progress=False)
    bad = [c for c in failure.value.checks if not c.ok]
    # Only the vision encoder at batch 3 diverges (the Q-Former and decoder are exact, and batch 1
    # takes the traced branch): the gate found the one frozen branch, nothing else.
    assert {(c.graph, c.output, c.case) for c in bad} == {(specs.VISION_ENCODER, specs.IMAGE_EMBEDS, "batch_size=3")}
    assert bad[0].max_abs_diff > 100 * bad[0].allowed
    assert digest(out) == before
    kept = failed_dir(out)
    assert failure.value.kept == kept and str(kept) in failure.value.summary
    report = json.loads((kept / "export_report.json").read_text())
    assert [c["ok"] for c in report["checks"]].count(False) == 1
    assert repository.graph_path(kept, specs.LLM_DECODER).exists()
    assert not list(kept.rglob("config.pbtxt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "repo.failed"]


def test_failing_gate_through_the_cli(tiny_checkpoints, tmp_path):
    out = tmp_path / "repo"
    result = run_cli("export", "--model", tiny_checkpoints("tiny-opt"), "--output", out, register_frozen=True)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "1 of" in errors[0] and "vision_encoder.image_embeds" in errors[0]
    assert "qformer." not in errors[0] and "llm_decoder." not in errors[0]
    assert str(out.with_name("repo.failed")) in errors[0]
    assert not out.exists()
    assert result.stdout == ""


def test_image_size_mismatch_is_refused(tiny_checkpoints, tmp_path):
    from blip2_triton.export.checkpoint import ProcessorMismatchError
    from blip2_triton.export.exporter import export_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints("tiny-opt"), ckpt)
    processor_config = ckpt / "processor_config.json"
    config = json.loads(processor_config.read_text())
    config["image_processor"]["size"] = {"height": 40, "width": 40}
    processor_config.write_text(json.dumps(config))
    with pytest.raises(ProcessorMismatchError, match="produces 40x40 images, but its vision encoder takes 32x32"):
        export_checkpoint(ckpt, tmp_path / "repo", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_processor_image_size_follows_resize_and_crop():
    from transformers import CLIPImageProcessor

    from blip2_triton.export.checkpoint import processor_image_size

    assert processor_image_size(CLIPImageProcessor(size={"shortest_edge": 40}, crop_size=32)) == (32, 32)
    assert processor_image_size(CLIPImageProcessor(size={"shortest_edge": 40}, do_center_crop=False)) is None
    assert processor_image_size(CLIPImageProcessor(size={"height": 24, "width": 24}, do_center_crop=False)) == (24, 24)
