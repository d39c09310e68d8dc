"""Quantized weights for the weight-heavy MatMuls (`blip2-triton export --quantize int8|int4`).

Dynamic quantization: weights are stored as int8 with one scale per output channel, activations
are quantized on the fly per call. Decoding on a CPU is bound by the bytes of weights read per
token, so 4x smaller weights are what makes int8 decoding fast. The token embedding stays fp32
(a Gather reads one row per token; quantizing it saves memory, not time).

int4: onnxruntime's MatMulNBits (weight-only, blockwise). Weights are 4-bit with one fp32 scale and
one 4-bit zero point per INT4_BLOCK_SIZE input rows of each output column (asymmetric: a
block's range need not be centred on zero); activations stay fp32 outside the op. Accuracy level
4 quantizes the activations to int8 per block inside the op, so the inner products run as int8 dot
products (AVX-512 VNNI / AVX-VNNI / AMX on x86, which the machines here have): onnxruntime's fast
path on such CPUs. Block size 32: finer scales than onnxruntime's default 128, for 1.28x the bytes
of bare 4 bits (an fp32 scale and a 4-bit zero point per 32 weights) against 1.07x.
"""
from __future__ import annotations

from pathlib import Path

from blip2_triton import specs

from .onnx_io import consolidate_external_data, graph_bytes

QUANTIZATIONS = ("int8", "int4")
# The graphs int4 pays for. A decode step reads every weight of the decoder for a few rows, so its
# time is the weights' bytes; MatMulNBits halves int8's. The vision encoder and the Q-Former multiply
# hundreds of rows per image: there int4 ran slower than fp32 on this project's CPUs, and dynamic
# int8 faster than both (README.md, "Quantized weights"), so an int4 export keeps them int8.
INT4_GRAPHS = (specs.LLM_DECODER,)
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4  # int8 activations, integer dot products (MatMulNBits' accuracy_level)


def graph_quantization(graph: str, quantize: str) -> str:
    """The weights a graph gets in a `--quantize` export: int4 only where it pays (INT4_GRAPHS)."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantize!r}")
    return "int4" if quantize == "int4" and graph in INT4_GRAPHS else "int8"


def quantize_graph(source: Path, target: Path, kind: str = "int8") -> Path:
    """Write a copy of the fp32 graph `source` with `kind` weights to `target`."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {kind!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    large = graph_bytes(source) > 2**31 - 2**24
    (_int4 if kind == "int4" else _int8)(source, target, large)
    if large:
        consolidate_external_data(target)
    return target


def _int4(source: Path, target: Path, large: bool) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(source))
    gemms_to_matmuls(model.graph)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=False,
                                     accuracy_level=INT4_ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=large)


def gemms_to_matmuls(graph) -> int:
    """Rewrite each Gemm with a constant weight as MatMul (+ Add of its bias), in place; -> how many.

    MatMulNBits replaces MatMuls only, and torch's export writes the linear layers it sees with
    2-D inputs (OPT's feed-forward, its LM head) as Gemm. A transposed weight (transB, torch's
    [out, in]) is stored transposed, [in, out], as MatMul takes it: in place, or as a new
    initializer when other nodes read it too (OPT's LM head shares the token embedding's).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    weights = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in weights or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = weights[node.input[1]]
        shared = users[weight.name] > 1
        if shared and not attrs.get("transB", 0):
            nodes.append(node)  # left as Gemm: quantizing a weight other nodes read needs a copy of it
            continue
        if attrs.get("transB", 0):
            name = weight.name + "/transposed" if shared else weight.name
            transposed = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), name)
            if shared:
                graph.initializer.append(transposed)
                weight = graph.initializer[-1]
            else:
                weight.CopyFrom(transposed)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = node.output[0] + "/matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight.name], [product], name=node.name + "/MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=node.name + "/Add"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def _int8(source: Path, target: Path, large: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

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
