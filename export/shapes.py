"""Fold the shape arithmetic that tracing leaves in front of every Reshape into constants.

transformers' `x.view(bsz, -1, heads, head_dim)` traces to Shape -> Gather -> Unsqueeze -> Concat
-> Reshape, because `bsz` is read from a tensor whose size is dynamic. In the OPT decoder that is
over half of its runtime nodes, and onnxruntime runs each of them at every decode step (a
noticeable share of a small model's step; README, "Graphs"). Where symbolic
shape inference shows that a dimension read this way is the same symbol as the Reshape input's
dimension at the same index, ONNX's Reshape can copy it (a 0 in the shape), so the whole shape is a
constant and the arithmetic feeding it is dead code.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger("blip2_triton.export")


def fold_reshape_shapes(path: Path) -> int:
    """Rewrite `path` in place; returns how many nodes were removed. External weights stay where they are."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path), load_external_data=False)
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    dims = {v.name: _dims(v) for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    constants = {t.name: t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}

    def constant_ints(name: str) -> list[int] | None:
        node = producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t).reshape(-1).tolist()
        if name in constants:
            return numpy_helper.to_array(constants[name]).reshape(-1).tolist()
        return None

    def shape_dim(name: str):
        """Unsqueeze(Gather(Shape(t), k)) -> the symbolic (or fixed) dim k of t, else None."""
        unsqueeze = producer.get(name)
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
            return None
        gather = producer.get(unsqueeze.input[0])
        if gather is None or gather.op_type != "Gather":
            return None
        shape = producer.get(gather.input[0])
        index = constant_ints(gather.input[1])
        if shape is None or shape.op_type != "Shape" or shape.attribute or index is None or len(index) != 1:
            return None
        source = dims.get(shape.input[0])
        return source[index[0]] if source is not None and -len(source) <= index[0] < len(source) else None

    folded = []  # (reshape node, constant shape node)
    for node in graph.node:
        if node.op_type != "Reshape" or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        concat = producer.get(node.input[1])
        data = dims.get(node.input[0])
        if concat is None or concat.op_type != "Concat" or data is None:
            continue
        shape = []
        for i, piece in enumerate(concat.input):
            value = constant_ints(piece)
            if value is not None and len(value) == 1:
                shape.append(value[0])
                continue
            dim = shape_dim(piece)
            if isinstance(dim, int):
                shape.append(dim)
            elif dim is not None and i < len(data) and data[i] == dim:
                shape.append(0)  # Reshape: 0 copies the input's dimension at this index
            else:
                break
        else:
            if shape.count(-1) <= 1:
                # A Constant node, not an initializer: saved with external data, an initializer
                # holding a shape would move out of the graph, where onnxruntime cannot read it.
                name = f"{node.name or node.output[0]}/folded_shape"
                value = numpy_helper.from_array(np.array(shape, np.int64), name)
                folded.append((node, onnx.helper.make_node("Constant", [], [name], name=name, value=value)))
                node.input[1] = name
    for reshape, constant in folded:
        graph.node.insert(list(graph.node).index(reshape), constant)
    removed = _remove_dead_nodes(graph)
    onnx.save(model, str(path))
    log.info("%s: %d reshape shapes folded, %d nodes removed", path.name, len(folded), removed)
    return removed


def _dims(value_info) -> list | None:
    if not value_info.type.HasField("tensor_type") or not value_info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def _remove_dead_nodes(graph) -> int:
    """Drop nodes none of whose outputs is used (repeatedly), then unused initializers."""
    before = len(graph.node)
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return before - len(graph.node)
