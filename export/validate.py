"""The export gate: every output of every graph, onnxruntime against PyTorch, each with its tolerance."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blip2_triton import specs
from blip2_triton.serving.onnx_graph import make_session

from .graphs import GraphExport

# Allowed |onnx - torch| per output by the graph's compute dtype: atol + rtol * max|torch|. fp32 graphs
# differ from eager PyTorch only by kernel summation order; fp16 ones by the rounding of every
# intermediate (even where an output, like the logits, is cast to fp32 at the end).
# int8 (dynamically quantized weights and activations) is compared with the fp32 module too, with a
# coarse bound that a graph with wrong or garbled weights fails by far (their error is ~100% of the
# output's range) while quantization noise passes; the accuracy evaluation is the real measure.
# int4 (MatMulNBits, the decoder) the same way, from measurement: the worst output's |diff| was
# 0.14 of its max|torch| on the trained embedded model, 0.38 on tiny-opt and 0.52 on tiny-t5 (random
# weights over a hidden width of one or two 32-row blocks quantize worst); another seed's weights
# gave at least 1.42 on every output. 0.8 sits between the two with room on both sides.
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (2e-2, 1e-2), "int8": (0.0, 0.25), "int4": (0.0, 0.8)}


@dataclass(frozen=True)
class OutputCheck:
    graph: str
    case: str
    output: str
    max_abs_diff: float
    allowed: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.allowed)

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return f"{self.graph:<15} {self.case:<42} {self.output:<28} max|diff|={self.max_abs_diff:.3e} allowed={self.allowed:.1e} {verdict}"


class ValidationError(RuntimeError):
    """One or more exported outputs differ from PyTorch beyond their tolerance.

    The first line of the message names every mismatching output (with its worst difference and
    tolerance) and where the failed attempt was kept; the lines after it list every failing case.
    """

    def __init__(self, checks: list[OutputCheck], output: Path | None = None, kept: Path | None = None):
        self.checks, self.output, self.kept = checks, output, kept
        bad = [c for c in checks if not c.ok]
        worst: dict[str, OutputCheck] = {}
        for c in bad:
            key = f"{c.graph}.{c.output}"
            if key not in worst or c.max_abs_diff > worst[key].max_abs_diff:
                worst[key] = c
        summary = (f"export validation failed: {len(bad)} of {len(checks)} outputs differ from PyTorch: "
                   + ", ".join(f"{k} (max|diff|={c.max_abs_diff:.2e} > {c.allowed:.1e})" for k, c in worst.items()))
        if output is not None:
            summary += f"; {output} was not changed"
        if kept is not None:
            summary += f"; report and graphs of the failed attempt (no config.pbtxt): {kept}"
        self.summary = summary
        super().__init__(summary + "\n" + "\n".join(map(str, bad)))


@dataclass(frozen=True)
class Case:
    """One validation case: its name (the sizes of the axes it sets), inputs and PyTorch's outputs."""

    name: str
    inputs: dict[str, np.ndarray]
    expected: tuple[np.ndarray, ...]  # float32, in the spec's output order


def reference_cases(export: GraphExport) -> list[Case]:
    """Every validation case of `export` through PyTorch. Computed once per graph, so that the
    exporter can free the PyTorch model before onnxruntime loads any graph (the validation peak is
    then one copy of the largest graph, not the model beside it)."""
    used = {d for t in export.spec.inputs for d in t.dims if isinstance(d, str)}
    cases = []
    for i, axes in enumerate(export.validation_axes):
        inputs = export.sample(axes, seed=100 + i)
        with torch.no_grad():
            expected = export.module(*(inputs[n] for n in export.spec.input_names))
        if isinstance(expected, torch.Tensor):
            expected = (expected,)
        cases.append(Case(",".join(f"{k}={v}" for k, v in axes.items() if k in used),
                          {k: v.numpy() for k, v in inputs.items()}, tuple(e.float().numpy() for e in expected)))
    return cases


def compare(spec: specs.GraphSpec, cases: list[Case], onnx_path: Path, providers: list[str] | None = None,
            precision: str | None = None, prepacking: bool = True) -> list[OutputCheck]:
    """Run every case through onnxruntime and compare output by output with PyTorch's.

    precision: the tolerance row to use; by default the graph's float dtype ("int8" for a
    quantized graph, whose checks are named `<graph>[int8]`).
    """
    sess = make_session(onnx_path, providers=providers, prepacking=prepacking)
    atol, rtol = TOLERANCES[precision or _float_dtype(spec)]
    checks = []
    for case in cases:
        got = sess.run(spec.output_names, {k: v.copy() for k, v in case.inputs.items()})
        for out_spec, exp, actual in zip(spec.outputs, case.expected, got):
            actual = actual.astype(np.float32)
            if exp.shape != actual.shape:
                diff = float("inf")
            else:
                exp, actual = _attended(out_spec, case.inputs, exp), _attended(out_spec, case.inputs, actual)
                diff = float(np.max(np.abs(exp - actual))) if exp.size else 0.0
            allowed = atol + rtol * (float(np.max(np.abs(exp))) if exp.size else 0.0)
            checks.append(OutputCheck(spec.name if precision is None else f"{spec.name}[{precision}]",
                                      case.name, out_spec.name, diff, allowed))
    return checks


def check_graph(export: GraphExport, onnx_path: Path, providers: list[str] | None = None,
                precision: str | None = None) -> list[OutputCheck]:
    """Every validation case through PyTorch and onnxruntime, compared output by output."""
    return compare(export.spec, reference_cases(export), onnx_path, providers, precision)


def _float_dtype(spec: specs.GraphSpec) -> str:
    """The graph's float dtype: its first float input's (a text-only graph: its first float output's)."""
    return next(t.dtype for t in (*spec.inputs, *spec.outputs) if t.dtype.startswith("float"))


def _attended(out_spec, inputs: dict, array: np.ndarray) -> np.ndarray:
    """Zero the cache positions past each row's length: no query reads them, and the graph leaves
    them as they were (in place) or zero (onnxruntime's copying path), so either is right."""
    if specs.ATTENTION_MASK not in inputs or len(out_spec.dims) != 4 or out_spec.dims[2] != specs.CACHE:
        return array
    lengths = inputs[specs.ATTENTION_MASK].sum(axis=1)
    kept = np.arange(array.shape[2])[None, :] < lengths[:, None]  # [B, M]
    return array * kept[:, None, :, None].astype(array.dtype)


def summarize(checks: list[OutputCheck]) -> dict[str, float]:
    """Max abs difference per graph, over all its outputs and cases."""
    out: dict[str, float] = {}
    for c in checks:
        out[c.graph] = max(out.get(c.graph, 0.0), c.max_abs_diff)
    return out
