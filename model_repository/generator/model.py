"""Triton model `generator` (decoupled): query embeddings + prompt ids -> generated tokens, streamed.

execute() only validates and enqueues; the engine thread runs every active sequence in one batched
decoder call per step and answers through each request's response sender.
"""
from blip2_triton import interface as api
from blip2_triton import specs
from blip2_triton.repository import assets_dir
from blip2_triton.serving import triton_io as io
from blip2_triton.serving.generator import GeneratorService


class TritonPythonModel:
    def initialize(self, args):
        self.args = io.ModelArgs(args)
        self.args.require_io(
            [specs.QUERY_EMBEDS, api.PROMPT_IDS.name, api.STREAM.name, *api.CONTROL_NAMES],
            [api.GENERATED_IDS.name, api.NEW_TOKENS.name, api.LAST.name],
        )
        self.service = GeneratorService(
            assets_dir(self.args.repository), self.args.version_dir / self.args.parameter("onnx_file"),
            stats=io.GeneratorMetrics(self.args.name),
        )
        self.service.engine.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.service.engine.submit(self.service.request(
                    query_embeds=io.row(request, specs.QUERY_EMBEDS),
                    prompt_ids=io.row(request, api.PROMPT_IDS.name),
                    controls={name: io.single(request, name) for name in api.CONTROL_NAMES},
                    stream=bool(io.single(request, api.STREAM.name) or False),
                    on_tokens=io.token_sender(sender),
                    on_error=io.error_sender(sender),
                    is_cancelled=lambda request=request: io.is_cancelled(request),
                ))
            except Exception as e:
                sender.send(io.error_response(e), flags=io.final_flag())
        return None

    def finalize(self):
        self.service.engine.stop()
