"""What one run of a graph must compute and read, for the shapes of a workload: the floors of the
vision encoder, the Q-Former and the prefill.

FLOPs are counted on the exported ONNX graph itself, not derived from the config: the graph is what
onnxruntime runs (with the export's own choices: the decoder's logits only at the last position,
fused attention, the Q-Former's cross-attention layers), and one counter then serves every family
and preset without a per-architecture formula to keep in step with transformers. The graph's
inputs are fixed to the workload's shapes and onnxruntime's symbolic shape inference (which knows
its contrib ops, such as GroupQueryAttention) gives every intermediate shape.

Counted: MatMul and Gemm (2 x M x N x K), Conv (2 per multiply-add), and fused attention (QK^T and
the weighted sum of V: 4 x rows x heads x queries x keys x head width, every key counted: the
causal half is not subtracted, as the CPU kernel does not skip it for a prefill from an empty
cache). Everything else (LayerNorm, Softmax, GELU, adds) is a few FLOPs per element and is left
out, so the compute floor is a lower bound. Bytes: every weight (initializer) read once, less the
lookup tables read by Gather alone, of which a run reads a few rows.
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from .machine import weights_read

ATTENTION_OPS = {"GroupQueryAttention", "MultiHeadAttention", "Attention"}


def graph_cost(path: str | Path, dims: dict[str, int]) -> dict:
    """FLOPs (by op type) and weight bytes read by one run of the graph at `path`, its inputs'
    named (dynamic) dimensions fixed to `dims`. -> {"flops", "flops_by_op", "weight_bytes_read", "shapes"}"""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path), load_external_data=False)
    shapes = {}
    for value in model.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                if d.dim_param not in dims:
                    raise ValueError(f"{path}: no size given for dimension {d.dim_param!r} of {value.name!r}")
                size = int(dims[d.dim_param])
                d.ClearField("dim_param")
                d.dim_value = size
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    known: dict[str, list[int]] = {}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        known[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    known.update({init.name: list(init.dims) for init in model.graph.initializer})

    def shape(name: str) -> list[int]:
        found = known.get(name)
        if found is None or any(d is None for d in found):
            raise ValueError(f"{path}: shape of {name!r} unknown after shape inference ({found})")
        return found

    flops: collections.Counter = collections.Counter()
    for node in model.graph.node:
        op = node.op_type
        if op == "MatMul":
            k = shape(node.input[0])[-1]
            flops[op] += 2 * int(np.prod(shape(node.output[0]))) * k
        elif op == "Gemm":
            a = shape(node.input[0])
            trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
            flops[op] += 2 * int(np.prod(shape(node.output[0]))) * (a[0] if trans_a else a[1])
        elif op == "Conv":
            w = shape(node.input[1])  # [out channels, in channels / groups, kernel...]
            flops[op] += 2 * int(np.prod(shape(node.output[0]))) * int(np.prod(w[1:]))
        elif op in ATTENTION_OPS:
            attrs = {att.name: att.i for att in node.attribute if att.type == att.INT}
            heads = attrs["num_heads"]
            query = shape(node.input[0])  # [batch, queries, heads x width]
            width = query[2] // heads
            keys = query[1]
            if op == "GroupQueryAttention" and len(node.input) > 6 and node.input[6]:
                # keys = past + new positions: the total_sequence_length input is a value, not a
                # shape, so it is taken from `dims`
                keys = dims.get("total_sequence_length", keys)
            flops[op] += 4 * query[0] * heads * query[1] * keys * width
    read = weights_read(model)["bytes_read_per_step"]
    return {"flops": int(sum(flops.values())), "flops_by_op": dict(flops), "weight_bytes_read": read,
            "shapes": {k: list(v) for k, v in shapes.items()}}


def floor(cost: dict, read_gbps: float, matmul_gflops: float) -> dict:
    """A graph run's floor (ms): the larger of its FLOPs at the measured fp32 matmul rate and its
    weight bytes at the measured read bandwidth."""
    compute_ms = cost["flops"] / (matmul_gflops * 1e9) * 1e3
    bytes_ms = cost["weight_bytes_read"] / (read_gbps * 1e9) * 1e3
    sig = lambda x: float(f"{x:.4g}")  # noqa: E731
    return {"gflops": sig(cost["flops"] / 1e9), "compute_floor_ms": sig(compute_ms), "bytes_floor_ms": sig(bytes_ms),
            "floor_ms": sig(max(compute_ms, bytes_ms)),
            "bound_by": "compute" if compute_ms >= bytes_ms else "memory bandwidth"}
