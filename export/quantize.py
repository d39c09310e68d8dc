"""int8 weights for the weight-heavy MatMuls (`blip2-triton export --quantize int8`).

Dynamic quantization: weights are stored as int8 with one scale per output channel, activations
are quantized on the fly per call. Decoding on a CPU is bound by the bytes of weights read per
token, so 4x smaller weights are what makes int8 decoding fast. The token embedding stays fp32
(a Gather reads one row per token; quantizing it saves memory, not time).
"""
from __future__ import annotations

from pathlib import Path

from .onnx_io import consolidate_external_data, graph_bytes

QUANTIZATIONS = ("int8",)


def quantize_graph(source: Path, target: Path) -> Path:
    """Write an int8-weight copy of the fp32 graph `source` to `target`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    large = graph_bytes(source) > 2**31 - 2**24
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        # Per output channel: one scale per row keeps the logits' ranking close to fp32 where a
        # single per-tensor scale visibly reorders the top tokens (measured on base-opt).
        per_channel=True,
        use_external_data_format=large,
        extra_options={"MatMulConstBOnly": True},
    )
    if large:
        consolidate_external_data(target)
    return target
