"""Triton model `blip2` (decoupled), the public API: image + prompt + controls -> streamed text.

execute() only reads the inputs and hands each request to a worker thread, which runs the
stateless stages as BLS calls (batched in their own models) and enqueues the request in the
generation engine; the engine thread runs every active sequence in one batched decoder call per
step and answers through each request's response sender. Because the request that Triton
cancels is the one this model holds, a client's cancellation frees its sequence at the next step.
As `blip2_ensemble`'s generator step it receives query embeddings and prompt ids instead of an
image and a prompt; a `stop` request ends the generation of the request with its id.
"""
import time
from concurrent.futures import ThreadPoolExecutor

from blip2_triton import api
from blip2_triton.serving import triton_io as io
from blip2_triton.serving.service import Blip2Service, Piece


class TritonPythonModel:
    def initialize(self, args):
        self.args = io.ModelArgs(args)
        self.args.require_io([t.name for t in api.PUBLIC_INPUTS], [t.name for t in api.PUBLIC_OUTPUTS])
        self.service = Blip2Service(
            self.args.repository, stages=io.BlsStages(), stats=io.EngineMetrics(self.args.name),
            threads=self.args.ort_threads(), compute_lock=self.args.compute_lock(),
            kv_budget=self.args.kv_budget(), max_waiting=self.args.max_queue_size(),
            image_cache=self.args.image_cache(),
        )
        self.service.engine.start()
        # BLS calls block: enough workers for a full batch of requests to wait in the stages together.
        self.workers = ThreadPoolExecutor(self.args.max_batch_size, thread_name_prefix="blip2-stages")

    def execute(self, requests):
        received = time.perf_counter()  # time to first token counts from here
        for request in requests:
            sender = request.get_response_sender()
            place = None
            try:
                inputs = io.pipeline_inputs(request)
                if "stop" in inputs:  # api.STOP: end the generation of the request with this id
                    self.service.stops.add(inputs["stop"])
                    io.piece_sender(sender)(Piece("", [], final=True))
                    continue
                place = self.service.engine.enter()  # refused when too many wait (max_queue_size)
                self.workers.submit(self._start, request, sender, inputs, received, place)
            except Exception as e:
                if place is not None:
                    place.release()
                sender.send(io.error_response(e), flags=io.final_flag())
        return None

    def _start(self, request, sender, inputs, received, place):
        try:
            generation = self.service.prepare(
                **inputs, emit=io.piece_sender(sender), on_error=io.error_sender(sender),
                is_cancelled=lambda: io.is_cancelled(request), request_id=io.request_id(request),
            )
            generation.received, generation.place = received, place
            self.service.engine.submit(generation)
        except Exception as e:
            place.release()
            sender.send(io.error_response(e), flags=io.final_flag())

    def finalize(self):
        self.workers.shutdown(wait=True)  # queued requests still get an answer (an error, at shutdown)
        self.service.engine.stop()
