"""Graph weights written and quantized one tensor at a time (the bounded-memory export, `export/bounded.py`).

torch's exporter builds the whole ModelProto, weights included, in memory before writing it: a
second copy of a graph's weights beside the module's. Traced with `export_params=False` and without
constant folding (which would materialise a transposed copy of every linear weight), the graph
takes its weights as inputs named after the module's tensors; `stream_weights` turns each into an
initializer in `<graph>.onnx.data`, written from the module's own tensor, folding the Transposes
that read a weight (torch writes `x @ W.T`) into a transposed copy of that one tensor.

The quantizers read the fp32 graph's external data tensor by tensor and write the quantized graph's
the same way, so memory holds one weight, not one graph:
- int8: com.microsoft DynamicQuantizeMatMul with int8 weights, symmetric, one scale per output
  column (what `quantize_dynamic(per_channel=True)` stores, as the op onnxruntime fuses its
  MatMulInteger pattern into);
- int4: com.microsoft MatMulNBits, 4-bit, block INT4_BLOCK_SIZE, asymmetric, accuracy level
  INT4_ACCURACY_LEVEL, packed by onnxruntime's own block quantizer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .quantize import INT4_ACCURACY_LEVEL, INT4_BLOCK_SIZE, QUANTIZATIONS

ALIGN = 4096  # onnxruntime memory-maps external data; page-aligned offsets keep that cheap
# Tensors smaller than this stay inside the .onnx file (biases, norms, scales): symbolic shape
# inference (export/shapes.py) reads some of them (a bias whose shape feeds a zeros_like), and
# it cannot read external data.
INLINE_BYTES = 256 * 2**10


class _DataWriter:
    """Appends tensors to one external-data file, page-aligned, and makes their initializers."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.name
        self.file = open(path, "wb")
        self.offset = 0

    def add(self, graph, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            graph.initializer.append(numpy_helper.from_array(array, name))
            return
        pad = (-self.offset) % ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(array.data)
        tensor = onnx.TensorProto(name=name, dims=list(array.shape),
                                  data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        graph.initializer.append(tensor)

    def close(self) -> None:
        self.file.close()


def _consumers(graph) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _perm(node, rank: int) -> list[int]:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return list(reversed(range(rank)))


def stream_weights(path: Path, module) -> int:
    """Turn the weight inputs of the graph `path` (traced with export_params=False) into
    initializers in `<path>.data`, one of `module`'s tensors at a time; -> bytes written."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    tensors = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    users = _consumers(graph)
    writer = _DataWriter(path.parent / (path.name + ".data"))
    dropped = []
    try:
        for inp in list(graph.input):
            if inp.name not in tensors:
                continue
            array = tensors[inp.name].detach().cpu().numpy()
            nodes = users.get(inp.name, [])
            transposes = [n for n in nodes if n.op_type == "Transpose"]
            for t in transposes:
                writer.add(graph, t.output[0], array.transpose(_perm(t, array.ndim)))
                dropped.append(t)
            if len(transposes) < len(nodes):
                writer.add(graph, inp.name, array)
            graph.input.remove(inp)
    finally:
        writer.close()
    for node in dropped:
        graph.node.remove(node)
    onnx.save(model, str(path))
    return writer.offset


class _DataReader:
    """One external tensor at a time from a graph's data file (read, not memory-mapped, so that
    the pages of tensors already done do not stay in the process)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def array(self, tensor) -> np.ndarray:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        info = {e.key: e.value for e in tensor.external_data}
        with open(self.directory / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            blob = f.read(int(info["length"]))
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(blob, dtype=dtype).reshape(tuple(tensor.dims))


def _int8_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] fp32 -> int8 [K, N], scale [N]: symmetric, one scale per output column."""
    absmax = np.abs(weight).max(axis=0).astype(np.float32)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    return quantized, scale


def _matmul_weight(node, initializers, attrs) -> tuple[str, bool] | None:
    """(weight name, transposed) of a MatMul / Gemm whose B is a constant 2-D fp32 initializer this
    quantizer can take; None for any other node."""
    if node.op_type == "MatMul":
        transposed = False
    elif node.op_type == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        transposed = bool(attrs.get("transB", 0))
    else:
        return None
    if len(node.input) < 2 or node.input[1] not in initializers:
        return None
    tensor = initializers[node.input[1]]
    if len(tensor.dims) != 2 or tensor.data_type != onnx.TensorProto.FLOAT:
        return None
    return node.input[1], transposed


def quantize_streaming(source: Path, target: Path, kind: str) -> Path:
    """Write `source` (an fp32 graph) with `kind` ("int8" / "int4") MatMul / Gemm weights to
    `target` and `<target>.data`, one weight in memory at a time."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {kind!r}")
    if kind == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer)

        nbits = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
            block_size=INT4_BLOCK_SIZE, is_symmetric=False, accuracy_level=INT4_ACCURACY_LEVEL))
    target.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    reader = _DataReader(source.parent)
    initializers = {t.name: t for t in graph.initializer}
    old = list(graph.initializer)
    del graph.initializer[:]
    writer = _DataWriter(target.parent / (target.name + ".data"))
    nodes, still_read = [], set()
    try:
        for node in graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            found = _matmul_weight(node, initializers, attrs)
            if found is None:
                nodes.append(node)
                still_read.update(node.input)
                continue
            name, transposed = found
            weight = reader.array(initializers[name])
            weight = np.ascontiguousarray(weight.T) if transposed else weight  # [K, N]
            k, n = weight.shape
            bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
            out = node.output[0]
            prefix = f"{name}/{node.name or out}"
            if kind == "int8":
                quantized, scale = _int8_columns(weight)
                writer.add(graph, prefix + "/int8", quantized)
                writer.add(graph, prefix + "/scale", scale)
                writer.add(graph, prefix + "/zero_point", np.zeros(n, np.int8))
                inputs = [node.input[0], prefix + "/int8", prefix + "/scale", prefix + "/zero_point"]
                if bias:
                    inputs.append(bias)
                    still_read.add(bias)
                nodes.append(helper.make_node("DynamicQuantizeMatMul", inputs, [out], name=f"{node.name}/int8",
                                              domain="com.microsoft"))
            else:
                packed, scales, zero_points = nbits.qbits_block_quant(weight)
                writer.add(graph, prefix + "/int4", packed)
                writer.add(graph, prefix + "/scales", scales)
                writer.add(graph, prefix + "/zero_points", zero_points)
                product = out + "/matmul" if bias else out
                nodes.append(helper.make_node(
                    "MatMulNBits", [node.input[0], prefix + "/int4", prefix + "/scales", prefix + "/zero_points"],
                    [product], name=f"{node.name}/int4", domain="com.microsoft", K=k, N=n, bits=4,
                    block_size=INT4_BLOCK_SIZE, accuracy_level=INT4_ACCURACY_LEVEL))
                if bias:
                    nodes.append(helper.make_node("Add", [product, bias], [out], name=f"{node.name}/bias"))
                    still_read.add(bias)
            still_read.add(node.input[0])
            del weight
        for tensor in old:  # the weights no quantized node replaced (embeddings, biases, norms)
            if tensor.name in still_read:
                writer.add(graph, tensor.name, reader.array(tensor))
    finally:
        writer.close()
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(target))
    return target
