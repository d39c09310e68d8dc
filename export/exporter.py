"""`blip2-triton export`: a BLIP-2 checkpoint -> validated ONNX graphs in a complete Triton model repository.

Everything is written into a staging directory beside `output` first; only when the validation
gate passes are the config.pbtxt files generated and the models moved into `output`. A failed
gate leaves `output` as it was and keeps the attempt's graphs and report, without any
config.pbtxt (nothing a server would load), in `<output>.failed`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blip2_triton import repository

from .checkpoint import check_image_size, load_checkpoint  # noqa: F401  (load_checkpoint: public here)
from .families import family_graphs
from .onnx_io import consolidate_external_data, export_module, graph_bytes
from .progress import Progress, peak_rss_mib
from .quantize import QUANTIZATIONS, quantize_graph
from .shapes import fold_reshape_shapes
from .validate import OutputCheck, ValidationError, check_graph, summarize

log = logging.getLogger("blip2_triton.export")

DTYPES = {"fp32": "float32", "fp16": "float16"}
REPORT = "export_report.json"


@dataclass
class ExportReport:
    model: str
    dtype: str
    validated: bool = True  # False with --no-validate: no output was compared with PyTorch
    graphs: dict[str, dict] = field(default_factory=dict)  # name -> {bytes, export_seconds}
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # graph -> max over its outputs and cases
    checks: list[dict] = field(default_factory=list)  # every output of every case, with its tolerance
    seconds: float = 0.0
    peak_rss_mib: float = 0.0


def failed_dir(output: Path) -> Path:
    """Where a failed export keeps its graphs and report."""
    return output.with_name(output.name + ".failed")


def export_checkpoint(
    model: str,
    output: str | Path,
    dtype: str = "fp32",
    validate: bool = True,
    providers: list[str] | None = None,
    progress: bool = True,
    quantize: str | None = None,
) -> ExportReport:
    """Export all graphs of `model` (hub id or directory) into the Triton repository `output`.

    quantize="int8": each graph is exported and validated in full precision first, then its
    MatMul weights are quantized and the int8 graph is validated (coarsely) too.
    Raises ValidationError when any output differs from PyTorch; `output` is then left as it was.
    progress: one line per step on stderr (loading, and per graph: trace + export, weights,
    shape folding, validation).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize is not None and (quantize not in QUANTIZATIONS or dtype != "fp32"):
        raise ValueError(f"--quantize must be one of {QUANTIZATIONS} and needs --dtype fp32, got {quantize!r}")
    float_dtype = DTYPES[dtype]
    output = Path(output)
    say = Progress(progress)
    report = ExportReport(model=str(model), dtype=dtype if quantize is None else f"{dtype}+{quantize}",
                          validated=validate)

    say(f"loading {model} ({dtype})")
    blip2, processor = load_checkpoint(model, float_dtype)
    check_image_size(processor, blip2.config)
    graphs = family_graphs(blip2, float_dtype)
    say(f"loaded in {time.perf_counter() - say.start:.1f} s, peak RSS {peak_rss_mib():.0f} MiB; "
        f"{len(graphs)} graphs: {', '.join(g.spec.name for g in graphs)}")

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would become the repository's mode
    try:
        checks: list[OutputCheck] = []
        for n, graph in enumerate(graphs, 1):
            checks += _export_graph(graph, staging, report, validate, providers, quantize,
                                    lambda step: say(f"[{n}/{len(graphs)}] {graph.spec.name}: {step}"))
        report.checks = [asdict(c) | {"ok": c.ok} for c in checks]
        report.max_abs_diff = summarize(checks)
        report.seconds = round(time.perf_counter() - say.start, 2)
        report.peak_rss_mib = round(peak_rss_mib(), 1)
        if any(not c.ok for c in checks):
            kept = failed_dir(output)
            if kept.exists():
                shutil.rmtree(kept)
            (staging / REPORT).write_text(json.dumps(asdict(report), indent=2))
            staging.rename(kept)
            raise ValidationError(checks, output=output, kept=kept)
        say("writing config.pbtxt files, model.py files and the checkpoint's processor, tokenizer and configs")
        repository.write_repository(staging, blip2.config, float_dtype, checkpoint_files=_save_assets(blip2, processor))
        (repository.assets_dir(staging) / REPORT).write_text(json.dumps(asdict(report), indent=2))
        _install(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    say(f"done: {output} in {report.seconds:.1f} s, peak RSS {report.peak_rss_mib:.0f} MiB")
    return report


def _export_graph(graph, staging: Path, report: ExportReport, validate: bool, providers, quantize, say) -> list[OutputCheck]:
    """Trace, write, fold and validate one graph into `staging` (then quantize it); -> its checks."""
    t0 = time.perf_counter()
    final = repository.graph_path(staging, graph.spec.name)
    path = final if quantize is None else staging / ".full-precision" / graph.spec.name / final.name
    say("trace + export")
    export_module(graph.module, graph.spec, graph.sample(graph.trace_axes), path, graph.custom_opsets)
    say("write weights" + (" (one external-data file)" if _has_external_files(path) else ""))
    consolidate_external_data(path)
    say("fold reshape shapes")
    fold_reshape_shapes(path)  # before validation: the gate checks the graph as it ships
    checks = []
    if validate:
        say(f"validate against PyTorch ({len(graph.validation_axes)} cases)")
        checks += check_graph(graph, path, providers)
    if quantize is not None:
        say(f"quantize ({quantize})")
        quantize_graph(path, final)
        shutil.rmtree(path.parent)
        if validate:
            say(f"validate {quantize} against PyTorch ({len(graph.validation_axes)} cases)")
            checks += check_graph(graph, final, providers, precision=quantize)
    seconds = time.perf_counter() - t0
    report.graphs[graph.spec.name] = {"bytes": graph_bytes(final), "export_seconds": round(seconds, 2)}
    worst = summarize(checks).get(graph.spec.name)
    say(f"{graph_bytes(final) / 2**20:.1f} MiB in {seconds:.1f} s, peak RSS {peak_rss_mib():.0f} MiB"
        + ("" if worst is None else f", max |onnx - torch| {worst:.2e}")
        + ("" if all(c.ok for c in checks) else ", MISMATCH"))
    for c in checks:
        log.info("%s", c)
    return checks


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _has_external_files(path: Path) -> bool:
    return any(p != path for p in path.parent.iterdir())


def _install(staging: Path, output: Path) -> None:
    """Move the staged models into `output`, replacing models of the same name and removing
    models an earlier export (or an older layout) left there; other files in `output` stay."""
    if not output.exists():
        staging.rename(output)
        return
    models = [p for p in staging.iterdir() if p.is_dir() and not p.name.startswith(".")]
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    try:
        for model in models:
            if (output / model.name).exists():
                (output / model.name).rename(old / model.name)
            model.rename(output / model.name)
        repository.remove_stale_models(output, {m.name for m in models})
    finally:
        shutil.rmtree(old)


def _save_assets(blip2, processor):
    """Writer of the files the server needs beside the graphs: processor, tokenizer, configs."""

    def write(directory: Path) -> None:
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        processor.save_pretrained(directory)
        blip2.config.save_pretrained(directory)
        blip2.generation_config.save_pretrained(directory)

    return write
