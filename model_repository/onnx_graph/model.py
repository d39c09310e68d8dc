"""Triton models `vision_encoder` and `qformer`: one stateless ONNX graph run by onnxruntime.

Requests that the dynamic batcher groups run as one batch; tensor names come from config.pbtxt,
which is generated from the same spec the graph was exported with.
"""
import numpy as np

from blip2_triton.serving import triton_io as io
from blip2_triton.serving.onnx_graph import OnnxGraph


class TritonPythonModel:
    def initialize(self, args):
        self.args = io.ModelArgs(args)
        self.graph = OnnxGraph(self.args.version_dir / self.args.parameter("onnx_file"),
                               compute_lock=self.args.compute_lock())
        self.args.require_io(self.graph.input_names, self.graph.output_names)

    def execute(self, requests):
        try:
            batch = {n: np.concatenate([io.tensor(r, n) for r in requests]) for n in self.graph.input_names}
            outputs = self.graph(**batch)
        except Exception as e:  # one failure answers every request of the batch, the model lives on
            return [io.error_response(e) for _ in requests]
        responses, start = [], 0
        for request in requests:
            rows = io.tensor(request, self.graph.input_names[0]).shape[0]
            responses.append(io.response({n: v[start : start + rows] for n, v in outputs.items()}, has_batch_dim=True))
            start += rows
        return responses
