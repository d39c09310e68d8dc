"""What the runs of a graph must compute and read, for the shapes of a workload: the floors of the
vision encoder, the Q-Former, the prefill and the decode step.

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
lookup tables read by Gather alone, of which a run reads a few rows; plus the cached keys and
values the run reads, counted from the graph's own inputs: those spanning the self-attention cache
axis (`max_sequence_length`) at the positions cached before the run, and those spanning the encoder
axis (`encoder_sequence_length`: an encoder-decoder LM's cross-attention keys and values) in full.

Which LM graphs a stage runs is read from the exported repository, not from the family's name: a
repository with an `llm_encoder` graph prefills by encoding the query embeddings and the prompt and
then taking the decoder's first step (the start token) over that encoding; one without feeds both
to its decoder at once.
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from blip2_triton import repository, specs

from .machine import weights_read
from .records import Floor, GraphCost

ATTENTION_OPS = {"GroupQueryAttention", "MultiHeadAttention", "Attention"}


def graph_cost(path: str | Path, dims: dict[str, int], read_positions: dict[str, int] | None = None) -> GraphCost:
    """FLOPs (by op type) and bytes read by one run of the graph at `path`, its inputs' named (dynamic)
    dimensions fixed to `dims` (names the graph lacks are ignored). `read_positions`: axis name ->
    positions of it the run reads, for the float inputs that span that axis (cached keys and values);
    their bytes go to `input_bytes_read` by axis."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes, inputs_read = {}, {}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        axes = [d.dim_param for d in tensor.shape.dim]
        for d in tensor.shape.dim:
            if not d.HasField("dim_value"):
                if d.dim_param not in dims:
                    raise ValueError(f"{path}: no size given for dimension {d.dim_param!r} of {value.name!r}")
                size = int(dims[d.dim_param])
                d.ClearField("dim_param")
                d.dim_value = size
        shapes[value.name] = [d.dim_value for d in tensor.shape.dim]
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
        for axis, positions in (read_positions or {}).items():
            if axis in axes and np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), np.floating):
                read = [positions if a == axis else n for a, n in zip(axes, shapes[value.name])]
                inputs_read[axis] = inputs_read.get(axis, 0) + int(np.prod(read)) * itemsize
    flops = _count_flops(model, path, dims)
    return GraphCost(flops=int(sum(flops.values())), flops_by_op=dict(flops),
                     weight_bytes_read=weights_read(model)["bytes_read_per_step"],
                     input_bytes_read=inputs_read if read_positions is not None else None,
                     dims={k: int(v) for k, v in dims.items()} if read_positions is not None else None,
                     shapes={k: list(v) for k, v in shapes.items()})


def _count_flops(model, path, dims: dict[str, int]) -> collections.Counter:
    """FLOPs by op type of a model whose inputs have fixed shapes (see the module docstring)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

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
                keys = dims.get(specs.TOTAL, keys)
            flops[op] += 4 * query[0] * heads * query[1] * keys * width
    return flops


def _encoder(repo: Path) -> Path | None:
    """The LM's encoder graph, if the repository has one (an encoder-decoder LM)."""
    path = repository.graph_path(repo, specs.LLM_ENCODER)
    return path if path.exists() else None


def prefill_positions(repo: Path, queries: int, prompt: int) -> int:
    """Self-attention positions the prefill leaves cached: the query embeddings and the prompt for
    a decoder-only LM, the start token for an encoder-decoder one."""
    return 1 if _encoder(repo) else queries + prompt


def _step_dims(new: int, past: int, encoded: int) -> dict[str, int]:
    total = past + new
    return {specs.BATCH: 1, specs.SEQUENCE: new, specs.PREFIX: 0, specs.TOTAL: total, specs.CACHE: total,
            specs.ENCODED: encoded}


def prefill_cost(repo: Path, queries: int, prompt: int) -> GraphCost:
    """Every LM graph run of one request's prefill (batch 1, an empty cache)."""
    decoder, encoder = repository.graph_path(repo, specs.LLM_DECODER), _encoder(repo)
    if encoder is None:
        dims = _step_dims(prompt, 0, 0) | {specs.PREFIX: queries, specs.TOTAL: queries + prompt,
                                            specs.CACHE: queries + prompt}
        return graph_cost(decoder, dims, {specs.CACHE: 0})
    encoded = queries + prompt
    return GraphCost.total({
        specs.LLM_ENCODER: graph_cost(encoder, {specs.BATCH: 1, specs.PREFIX: queries, specs.SEQUENCE: prompt}, {}),
        specs.LLM_DECODER: graph_cost(decoder, _step_dims(1, 0, encoded), {specs.CACHE: 0, specs.ENCODED: encoded}),
    })


def decode_step_cost(repo: Path, queries: int, prompt: int, past: int) -> GraphCost:
    """One batch-1 decode step with `past` positions cached: the decoder's weights, its
    self-attention cache and (encoder-decoder LMs) the cross-attention keys and values over the
    query embeddings and the prompt."""
    encoded = queries + prompt
    return graph_cost(repository.graph_path(repo, specs.LLM_DECODER), _step_dims(1, past, encoded),
                      {specs.CACHE: past, specs.ENCODED: encoded})


def _sig(x: float) -> float:
    """4 significant digits, not decimals: the tiny model's int8 floor is well under a microsecond."""
    return float(f"{x:.4g}")


def _bounds(cost: GraphCost, read_gbps: float, matmul_gflops: float) -> tuple[float, float]:
    """(compute ms, bytes ms) of a run."""
    return cost.flops / (matmul_gflops * 1e9) * 1e3, cost.bytes_read / (read_gbps * 1e9) * 1e3


def floor(cost: GraphCost, read_gbps: float, matmul_gflops: float) -> dict:
    """A stage's floor (ms): the larger of its FLOPs at the measured fp32 matmul rate and its bytes
    at the measured read bandwidth (the StageFloor fields other than the measured ones)."""
    compute_ms, bytes_ms = _bounds(cost, read_gbps, matmul_gflops)
    return {"gflops": _sig(cost.flops / 1e9), "compute_floor_ms": _sig(compute_ms), "bytes_floor_ms": _sig(bytes_ms),
            "floor_ms": _sig(max(compute_ms, bytes_ms)),
            "bound_by": "compute" if compute_ms >= bytes_ms else "memory bandwidth"}


def decode_floor(cost: GraphCost, read_gbps: float, matmul_gflops: float) -> Floor:
    """The lower bound of one batch-1 decode step, from bandwidth and from compute."""
    compute_ms, bandwidth_ms = _bounds(cost, read_gbps, matmul_gflops)
    return Floor(bandwidth_floor_ms=_sig(bandwidth_ms), compute_floor_ms=_sig(compute_ms),
                 floor_ms=_sig(max(bandwidth_ms, compute_ms)),
                 bound_by="memory bandwidth" if bandwidth_ms >= compute_ms else "compute", bytes_read=cost.bytes_read)
