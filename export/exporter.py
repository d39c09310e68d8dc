"""`blip2-triton export`: a BLIP-2 checkpoint -> validated ONNX graphs in a complete Triton model repository."""
from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blip2_triton import repository

from .families import family_graphs
from .onnx_io import export_module, graph_bytes
from .quantize import QUANTIZATIONS, quantize_graph
from .shapes import fold_reshape_shapes
from .validate import OutputCheck, ValidationError, check_graph, summarize

log = logging.getLogger("blip2_triton.export")

DTYPES = {"fp32": "float32", "fp16": "float16"}


@dataclass
class ExportReport:
    model: str
    dtype: str
    graphs: dict[str, dict] = field(default_factory=dict)  # name -> {bytes, export_seconds}
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_checkpoint(model: str, float_dtype: str = "float32"):
    """Model (eager attention, for tracing) and processor via transformers' own from_pretrained."""
    import torch
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model)
    blip2 = Blip2ForConditionalGeneration.from_pretrained(
        model, dtype=getattr(torch, float_dtype), attn_implementation="eager"
    ).eval()
    return blip2, processor


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
    Raises ValidationError (after writing everything) when any output differs from PyTorch.
    """
    import tempfile

    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize is not None and (quantize not in QUANTIZATIONS or dtype != "fp32"):
        raise ValueError(f"--quantize must be one of {QUANTIZATIONS} and needs --dtype fp32, got {quantize!r}")
    float_dtype = DTYPES[dtype]
    output = Path(output)
    start = time.perf_counter()
    report = ExportReport(model=str(model), dtype=dtype if quantize is None else f"{dtype}+{quantize}")
    scratch = tempfile.TemporaryDirectory(prefix="blip2-export-")

    log.info("loading %s (%s)", model, dtype)
    blip2, processor = load_checkpoint(model, float_dtype)
    graphs = family_graphs(blip2, float_dtype)
    checks: list[OutputCheck] = []
    steps = tqdm(graphs, desc="export", unit="graph", disable=not progress)
    for graph in steps:
        steps.set_postfix_str(graph.spec.name)
        t0 = time.perf_counter()
        final = repository.graph_path(output, graph.spec.name)
        full = final if quantize is None else Path(scratch.name) / graph.spec.name / final.name
        path = export_module(graph.module, graph.spec, graph.sample(graph.trace_axes), full, graph.custom_opsets)
        fold_reshape_shapes(path)  # before validation: the gate checks the graph as it ships
        graph_checks = []
        if validate:
            steps.set_postfix_str(f"{graph.spec.name} (validating)")
            graph_checks += check_graph(graph, path, providers)
        if quantize is not None:
            steps.set_postfix_str(f"{graph.spec.name} ({quantize})")
            path = quantize_graph(full, final)
            shutil.rmtree(full.parent)
            if validate:
                graph_checks += check_graph(graph, path, providers, precision=quantize)
        report.graphs[graph.spec.name] = {"bytes": graph_bytes(path), "export_seconds": round(time.perf_counter() - t0, 2)}
        log.info("%s: %.1f MiB in %.1fs, peak RSS %.0f MiB", graph.spec.name, graph_bytes(path) / 2**20,
                 time.perf_counter() - t0, peak_rss_mib())
        for c in graph_checks:
            log.info("%s", c)
        checks += graph_checks

    scratch.cleanup()
    repository.write_repository(output, blip2.config, float_dtype, checkpoint_files=_save_assets(blip2, processor))
    report.checks = [asdict(c) | {"ok": c.ok} for c in checks]
    report.max_abs_diff = summarize(checks)
    report.seconds = round(time.perf_counter() - start, 2)
    report.peak_rss_mib = round(peak_rss_mib(), 1)
    (repository.assets_dir(output) / "export_report.json").write_text(json.dumps(asdict(report), indent=2))
    if any(not c.ok for c in checks):
        raise ValidationError(checks)
    return report


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
