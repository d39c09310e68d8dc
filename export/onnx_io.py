"""Writing one torch module as one ONNX graph, with large weights in a single external-data file."""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from blip2_triton.specs import GraphSpec

OPSET = 17
# Protobuf cannot serialise a message over 2 GiB, so bigger graphs keep their weights outside.
PROTOBUF_LIMIT = 2**31 - 1


def export_module(module: torch.nn.Module, spec: GraphSpec, sample: dict[str, torch.Tensor], path: Path,
                  custom_opsets: dict[str, int] | None = None, with_weights: bool = True) -> Path:
    """Trace `module` on `sample` (keyed by the spec's input names) and write `path` per `spec`.

    The TorchScript exporter is used: it takes the spec's dynamic axes as they are declared and
    traces transformers' modules without a rewrite. For graphs over 2 GiB it writes one file per
    tensor next to `path`; `consolidate_external_data` folds those into `<path>.data`.
    with_weights=False: the weights become graph inputs named after the module's tensors, and
    nothing is constant-folded (folding `W.T` would copy every linear weight); the caller writes
    them (streaming.stream_weights).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(sample[name] for name in spec.input_names)
    # Tracing warns about every Python-level branch in transformers' code; the validation gate,
    # run on shapes other than the traced ones, is what catches a branch frozen the wrong way.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes,
            opset_version=OPSET,
            custom_opsets=custom_opsets or {},
            do_constant_folding=with_weights,
            export_params=with_weights,
            dynamo=False,
        )
    return path


def consolidate_external_data(path: Path) -> None:
    """Move every externally stored tensor of `path` into one `<name>.data` file, streaming.

    Reads the graph without its weights and copies each tensor file in turn, so memory stays at
    one tensor, not one model. A graph with no external tensors is left as it is.
    """
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in _all_initializers(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    sources = {path.parent / _external_info(t)["location"] for t in external}
    if sources == {data_path}:
        return  # already one file
    if data_path in sources:
        raise RuntimeError(f"{path}: {data_name} is mixed with per-tensor files")
    offset = 0
    with open(data_path, "wb") as out:
        for tensor in external:
            info = _external_info(tensor)
            with open(path.parent / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                blob = f.read(int(info["length"])) if "length" in info else f.read()
            # onnxruntime memory-maps external data; page-aligned offsets keep that cheap.
            pad = (-offset) % 4096
            out.write(b"\0" * pad)
            offset += pad
            out.write(blob)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(blob)
    onnx.save(model, str(path))
    for source in sources:
        source.unlink()


def _external_info(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.t is not None and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                yield attr.t


def graph_bytes(path: Path) -> int:
    """Size on disk of a graph and its external data."""
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
