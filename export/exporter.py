"""`blip2-triton export`: a BLIP-2 checkpoint -> validated ONNX graphs in a complete Triton model repository.

Everything is written into a staging directory beside `output` first; only when the validation
gate passes are the config.pbtxt files generated and the models moved into `output`. A failed
gate leaves `output` as it was and keeps the attempt's graphs and report, without any
config.pbtxt (nothing a server would load), in `<output>.failed`.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blip2_triton import repository
from blip2_triton.progress import Progress, peak_rss_mib

from .checkpoint import check_image_size, load_checkpoint  # noqa: F401  (load_checkpoint: public here)
from .families import family_graphs
from .onnx_io import consolidate_external_data, export_module, graph_bytes
from .quantize import QUANTIZATIONS, graph_quantization, quantize_graph
from .repository_writer import remove_stale_models, write_repository
from .shapes import fold_reshape_shapes
from .validate import OutputCheck, ValidationError, compare, reference_cases, summarize

log = logging.getLogger("blip2_triton.export")

DTYPES = {"fp32": "float32", "fp16": "float16"}
REPORT = "export_report.json"
FULL_PRECISION = ".full-precision"  # staged graphs a --quantize export quantizes


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
    sizing=None,
    stateless_backend: str = "python",
    image_cache_bytes: int | None = repository.DEFAULT_IMAGE_CACHE_BYTES,
) -> ExportReport:
    """Export all graphs of `model` (hub id or directory) into the Triton repository `output`.

    image_cache_bytes: the bound of `blip2`'s image cache (its config.pbtxt); None turns it off.

    quantize="int8" / "int4": each graph is exported and validated in full precision first, then its
    MatMul weights are quantized (int4: the decoder only, the others int8; quantize.INT4_GRAPHS)
    and the quantized graph is validated (coarsely) too.
    Raises ValidationError when any output differs from PyTorch; `output` is then left as it was.
    progress: one line per step on stderr (loading; per graph: trace + export, weights, shape
    folding, PyTorch reference outputs; then per graph: validation in onnxruntime).
    sizing: instances, threads, batching and devices per model (blip2_triton.sizing.Sizing; default:
    one instance of each model on the CPU). stateless_backend: "onnxruntime" has Triton's own
    onnxruntime backend run the vision encoder and Q-Former (NVIDIA's containers only).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize is not None and (quantize not in QUANTIZATIONS or dtype != "fp32"):
        raise ValueError(f"--quantize must be one of {QUANTIZATIONS} and needs --dtype fp32, got {quantize!r}")
    float_dtype = DTYPES[dtype]
    output = Path(output)
    steps = Progress("export", progress)
    say = steps.say
    report = ExportReport(model=str(model), dtype=dtype if quantize is None else f"{dtype}+{quantize}",
                          validated=validate)

    say(f"loading {model} ({dtype})")
    blip2, processor = load_checkpoint(model, float_dtype)
    check_image_size(processor, blip2.config)
    config, generation_config = blip2.config, getattr(blip2, "generation_config", None)  # None: retrieval
    graphs = family_graphs(blip2, float_dtype)
    names = [g.spec.name for g in graphs]
    say(f"loaded in {time.perf_counter() - steps.start:.1f} s, peak RSS {peak_rss_mib():.0f} MiB; "
        f"{len(graphs)} graphs: {', '.join(names)}")

    def step(n: int):
        return lambda what: say(f"[{n}/{len(names)}] {names[n - 1]}: {what}")

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would become the repository's mode
    try:
        # Phase 1, with the PyTorch model: trace every graph, and run its validation cases in PyTorch.
        staged = [_write_graph(graph, staging, report, validate, quantize, step(n)) for n, graph in enumerate(graphs, 1)]
        # Phase 2, without it: dropping the model's weights before onnxruntime loads a graph keeps the
        # peak at the model plus one graph being written, or one graph in onnxruntime, not both.
        del blip2, graphs
        gc.collect()
        say(f"PyTorch model released: RSS {_rss_mib():.0f} MiB")
        checks: list[OutputCheck] = []
        for n, item in enumerate(staged, 1):
            checks += _validate_graph(*item, staging, report, providers, quantize, step(n))
        shutil.rmtree(staging / FULL_PRECISION, ignore_errors=True)  # emptied graph by graph; not shipped
        report.checks = [asdict(c) | {"ok": c.ok} for c in checks]
        report.max_abs_diff = summarize(checks)
        report.seconds = round(time.perf_counter() - steps.start, 2)
        report.peak_rss_mib = round(peak_rss_mib(), 1)
        if any(not c.ok for c in checks):
            kept = failed_dir(output)
            if kept.exists():
                shutil.rmtree(kept)
            (staging / REPORT).write_text(json.dumps(asdict(report), indent=2))
            staging.rename(kept)
            raise ValidationError(checks, output=output, kept=kept)
        say("writing config.pbtxt files, model.py files and the checkpoint's processor, tokenizer and configs")
        write_repository(staging, config, float_dtype, checkpoint_files=_save_assets(config, generation_config, processor),
                         sizing=sizing, stateless_backend=stateless_backend, image_cache_bytes=image_cache_bytes)
        (repository.checkpoint_dir(staging, config) / REPORT).write_text(json.dumps(asdict(report), indent=2))
        _install(staging, output, keep=set(repository.other_models(config)))
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    say(f"done: {output} in {report.seconds:.1f} s, peak RSS {report.peak_rss_mib:.0f} MiB")
    return report


def _write_graph(graph, staging: Path, report: ExportReport, validate: bool, quantize, say):
    """Trace one graph into `staging`, write its weights, fold its shapes, and compute its PyTorch
    reference outputs; -> (spec, ONNX path, reference cases) for `_validate_graph`."""
    t0 = time.perf_counter()
    final = repository.graph_path(staging, graph.spec.name)
    path = final if quantize is None else staging / FULL_PRECISION / graph.spec.name / final.name
    say("trace + export")
    export_module(graph.module, graph.spec, graph.sample(graph.trace_axes), path, graph.custom_opsets)
    say("write weights" + (" (one external-data file)" if _has_external_files(path) else ""))
    consolidate_external_data(path)
    say("fold reshape shapes")
    fold_reshape_shapes(path)  # before validation: the gate checks the graph as it ships
    cases = []
    if validate:
        say(f"PyTorch reference outputs ({len(graph.validation_axes)} cases)")
        cases = reference_cases(graph)
    seconds = time.perf_counter() - t0
    report.graphs[graph.spec.name] = {"export_seconds": round(seconds, 2)}  # its bytes: as shipped, after validation
    say(f"written, {graph_bytes(path) / 2**20:.1f} MiB in {seconds:.1f} s, peak RSS {peak_rss_mib():.0f} MiB")
    return graph.spec, path, cases


def _validate_graph(spec, path: Path, cases, staging: Path, report: ExportReport, providers, quantize,
                    say) -> list[OutputCheck]:
    """Run the reference cases in onnxruntime (then quantize, and check the quantized graph too)."""
    t0 = time.perf_counter()
    checks = []
    if cases:
        say(f"validate in onnxruntime against PyTorch ({len(cases)} cases)")
        checks += compare(spec, cases, path, providers)
    final = repository.graph_path(staging, spec.name)
    if quantize is not None:
        kind = graph_quantization(spec.name, quantize)
        say(f"quantize ({kind})")
        quantize_graph(path, final, kind)
        shutil.rmtree(path.parent)
        if cases:
            say(f"validate {kind} in onnxruntime against PyTorch ({len(cases)} cases)")
            checks += compare(spec, cases, final, providers, precision=kind)
    entry = report.graphs[spec.name]
    entry.update(bytes=graph_bytes(final), export_seconds=round(entry["export_seconds"] + time.perf_counter() - t0, 2))
    if checks:
        worst = max(c.max_abs_diff for c in checks)
        say(f"max |onnx - torch| {worst:.2e}{'' if all(c.ok for c in checks) else ', MISMATCH'}"
            f", peak RSS {peak_rss_mib():.0f} MiB")
    for c in checks:
        log.info("%s", c)
    return checks


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _has_external_files(path: Path) -> bool:
    return any(p != path for p in path.parent.iterdir())


def _install(staging: Path, output: Path, keep: set[str] = frozenset()) -> None:
    """Move the staged models into `output`, replacing models of the same name and removing
    models an earlier export (or an older layout) left there, except those named in `keep` (the
    other kind of export's: generation and retrieval models share a repository); other files stay."""
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
        remove_stale_models(output, {m.name for m in models} | keep)
    finally:
        shutil.rmtree(old)


def _save_assets(config, generation_config, processor):
    """Writer of the files the server needs beside the graphs: processor, tokenizer, configs."""

    def write(directory: Path) -> None:
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        processor.save_pretrained(directory)
        config.save_pretrained(directory)
        if generation_config is not None:  # a retrieval checkpoint generates nothing
            generation_config.save_pretrained(directory)

    return write
