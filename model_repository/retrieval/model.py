"""Triton models `embed_image`, `embed_text` and `match`: a retrieval checkpoint's public calls.

config.pbtxt's `call` parameter says which call this model serves. Each request of a batch runs
on a worker thread, its stages as BLS calls, so the requests of one batch (and of the three
models) meet in the stages' dynamic batchers. A bad request gets its own INVALID_ARGUMENT.
"""
from concurrent.futures import ThreadPoolExecutor

from blip2_triton import api
from blip2_triton.repository import CALL, CHECKPOINT_DIR
from blip2_triton.serving import triton_io as io
from blip2_triton.serving.retrieval import RetrievalService


class TritonPythonModel:
    def initialize(self, args):
        self.args = io.ModelArgs(args)
        self.call = self.args.parameter(CALL)
        if self.call not in api.RETRIEVAL_CALLS:
            raise ValueError(f"model {self.args.name!r}: parameter {CALL!r} must be one of {api.RETRIEVAL_CALLS}, "
                             f"got {self.call!r}")
        self.inputs = [t["name"] for t in self.args.config["input"]]
        self.service = RetrievalService(self.args.repository / self.args.parameter(CHECKPOINT_DIR),
                                        stages=io.RetrievalBlsStages())
        self.workers = ThreadPoolExecutor(self.args.max_batch_size, thread_name_prefix=self.call)

    def execute(self, requests):
        return list(self.workers.map(self._answer, requests))

    def _answer(self, request):
        try:
            inputs = {name: io.single(request, name) for name in self.inputs}
            return io.response(self.service.call(self.call, **inputs))
        except Exception as e:
            return io.error_response(e)

    def finalize(self):
        self.workers.shutdown(wait=True)
