"""Triton models `vision_encoder`, `qformer` and a retrieval checkpoint's graphs: one stateless
ONNX graph run by onnxruntime.

Requests that the dynamic batcher groups run as one batch (those of one shape together: texts of
different lengths run apart); tensor names come from config.pbtxt, which is generated from the same
spec the graph was exported with.
"""
from blip2_triton.serving import triton_io as io
from blip2_triton.serving.onnx_graph import OnnxGraph, run_batched


class TritonPythonModel:
    def initialize(self, args):
        self.args = io.ModelArgs(args)
        self.graph = OnnxGraph(self.args.version_dir / self.args.parameter("onnx_file"), threads=self.args.ort_threads(),
                               providers=self.args.ort_providers(), compute_lock=self.args.compute_lock())
        self.args.require_io(self.graph.input_names, self.graph.output_names)

    def execute(self, requests):
        try:
            inputs = [{n: io.tensor(r, n) for n in self.graph.input_names} for r in requests]
        except Exception as e:  # the model lives on; every request of the batch gets the error
            return [io.error_response(e) for _ in requests]
        results = run_batched(self.graph, inputs)
        return [io.error_response(r) if isinstance(r, Exception) else io.response(r, has_batch_dim=True) for r in results]
