"""The one module that touches `triton_python_backend_utils`: tensors in and out, errors, metrics.

model.py files stay thin by calling these; everything else in `blip2_triton.serving` is plain
Python that tests import without a server. pb_utils only exists inside the backend stub, so it is
imported on first use.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from blip2_triton import api
from blip2_triton import specs
from blip2_triton.errors import Cancelled, InvalidInput, ResourceExhausted, Unavailable
from blip2_triton.repository import (DEFAULT_KV_CACHE_BUDGET, DEFAULT_MAX_QUEUE_SIZE, IMAGE_CACHE, IMAGE_CACHE_BYTES,
                                     KV_CACHE_BUDGET, MAX_QUEUE_SIZE)
from blip2_triton.sizing import EXCLUSIVE_COMPUTE, ORT_PROVIDERS, ORT_THREADS

from .compute_lock import ComputeLock
from .engine import TIMED_STAGES, EngineStats, kv_budget
from .image_cache import ImageCache, ImageCacheStats

log = logging.getLogger("blip2_triton.serving")


def pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


# ---- model config -----------------------------------------------------------------------------
class ModelArgs:
    """What `initialize(args)` receives, parsed: the model config, its folder, the repository root."""

    def __init__(self, args: dict):
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.model_dir = Path(args["model_repository"])
        self.version_dir = self.model_dir / args["model_version"]
        self.repository = self.model_dir.parent
        self.instance = args.get("model_instance_name", self.name)
        self.max_batch_size = int(self.config.get("max_batch_size", 0)) or 1

    def parameter(self, key: str, default: str | None = None) -> str:
        params = self.config.get("parameters", {})
        if key in params:
            return params[key]["string_value"]
        if default is None:
            raise ValueError(f"model {self.name!r}: config.pbtxt lacks parameter {key!r}")
        return default

    def switch(self, key: str, default: str = "false") -> bool:
        value = self.parameter(key, default).lower()
        if value not in ("true", "false"):
            raise ValueError(f"model {self.name!r}: parameter {key!r} must be \"true\" or \"false\", got {value!r}")
        return value == "true"

    def compute_lock(self):
        """The repository's ComputeLock if config.pbtxt asks for exclusive compute, else None."""
        return ComputeLock.for_repository(self.repository) if self.switch(EXCLUSIVE_COMPUTE) else None

    def image_cache(self) -> ImageCache | None:
        """The image cache config.pbtxt asks for, reporting to Triton's metrics; None when off."""
        if not self.switch(IMAGE_CACHE):
            return None
        text = self.parameter(IMAGE_CACHE_BYTES)
        try:
            size = int(text)
        except ValueError:
            size = 0
        if size <= 0:
            raise ValueError(f"model {self.name!r}: parameter {IMAGE_CACHE_BYTES!r} must be a positive "
                             f"number of bytes, got {text!r}")
        return ImageCache(size, ImageCacheMetrics(self.name))

    def ort_threads(self) -> int | None:
        """onnxruntime intra-op threads config.pbtxt asks for (sizing.ORT_THREADS), or None."""
        value = self.parameter(ORT_THREADS, "").strip()
        if value and (not value.isdigit() or int(value) < 1):
            raise ValueError(f"model {self.name!r}: parameter {ORT_THREADS!r} must be an integer >= 1, got {value!r}")
        return int(value) if value else None

    def ort_providers(self) -> list[str] | None:
        """onnxruntime execution providers config.pbtxt asks for (sizing.ORT_PROVIDERS), or None (CPU)."""
        value = self.parameter(ORT_PROVIDERS, "").strip()
        return [p.strip() for p in value.split(",") if p.strip()] or None

    def kv_budget(self) -> int:
        """The KV cache budget in bytes (parameter kv_cache_budget; absent: sized from the machine)."""
        try:
            return kv_budget(self.parameter(KV_CACHE_BUDGET, DEFAULT_KV_CACHE_BUDGET))
        except ValueError as e:
            raise ValueError(f"model {self.name!r}: {e}") from None

    def max_queue_size(self) -> int:
        """Requests that may wait for the engine (parameter max_queue_size)."""
        value = self.parameter(MAX_QUEUE_SIZE, str(DEFAULT_MAX_QUEUE_SIZE))
        if not value.strip().isdigit():
            raise ValueError(f"model {self.name!r}: parameter {MAX_QUEUE_SIZE!r} must be a count >= 0, got {value!r}")
        return int(value)

    def output_dtype(self, name: str) -> np.dtype:
        """An output's numpy dtype, read back from the config rather than repeated in code."""
        cfg = pb().get_output_config_by_name(self.config, name)
        if cfg is None:
            raise ValueError(f"model {self.name!r}: config.pbtxt has no output {name!r}")
        return pb().triton_string_to_numpy(cfg["data_type"])

    def require_io(self, inputs: Iterable[str], outputs: Iterable[str]) -> None:
        """Fail at load time when the config contradicts the code (a renamed or missing tensor)."""
        have_in = {t["name"] for t in self.config.get("input", [])}
        have_out = {t["name"] for t in self.config.get("output", [])}
        missing = [n for n in inputs if n not in have_in] + [n for n in outputs if n not in have_out]
        if missing:
            raise ValueError(f"model {self.name!r}: config.pbtxt lacks tensors {missing}")


# ---- reading requests ---------------------------------------------------------------------------
def tensor(request, name: str) -> np.ndarray | None:
    t = pb().get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def single(request, name: str, required: bool = False):
    """The one value of a per-request [1, 1] input, as a Python scalar/bytes; None if absent."""
    value = tensor(request, name)
    if value is None:
        if required:
            raise InvalidInput(f"{name}: required input is missing", api.Reason.INPUT)
        return None
    if value.size != 1:
        raise InvalidInput(f"{name}: expected one value per request (shape [1, 1]), got shape {list(value.shape)}",
                           api.Reason.INPUT)
    item = value.reshape(-1)[0]
    return item if isinstance(item, bytes) else item.item()


def pipeline_inputs(request) -> dict:
    """The inputs of one `blip2` request, as Blip2Service.prepare's keyword arguments: a client's
    image and prompt, or, from the ensemble's generator step, the Q-Former's output and the prompt ids."""
    if single(request, api.STOP.name):
        return {"stop": request_id(request)}
    inputs = {
        "stream": bool(single(request, api.STREAM.name) or False),
        "controls": {name: single(request, name) for name in api.CONTROL_NAMES},
    }
    if tensor(request, specs.QUERY_EMBEDS) is None:
        return inputs | {"image": single(request, api.IMAGE.name, required=True),
                         "prompt": single(request, api.PROMPT.name)}
    if tensor(request, api.IMAGE.name) is not None or tensor(request, api.PROMPT.name) is not None:
        raise InvalidInput(f"send {api.IMAGE.name} (and {api.PROMPT.name}) or {specs.QUERY_EMBEDS} and "
                           f"{api.PROMPT_IDS.name} (what {api.ENSEMBLE!r} sends), not both", api.Reason.INPUT)
    return inputs | {"query_embeds": row(request, specs.QUERY_EMBEDS), "prompt_ids": row(request, api.PROMPT_IDS.name)}


def request_id(request) -> str:
    """The request's id as the client set it ("" if none); an ensemble's steps carry the client's."""
    return request.request_id() or ""


def row(request, name: str) -> np.ndarray:
    """A per-request [1, ...] input without its batch dimension."""
    value = tensor(request, name)
    if value is None:
        raise InvalidInput(f"{name}: required input is missing", api.Reason.INPUT)
    if value.shape[0] != 1:
        raise InvalidInput(f"{name}: send one item per request (batch dimension 1), got {value.shape[0]}",
                           api.Reason.INPUT)
    return value[0]


# ---- responses ------------------------------------------------------------------------------------
def response(outputs: dict[str, np.ndarray], has_batch_dim: bool = False):
    """A response; a batch dimension of 1 is added to every output unless it has one."""
    p = pb()
    tensors = [p.Tensor(n, np.ascontiguousarray(v if has_batch_dim else np.asarray(v)[None, ...])) for n, v in outputs.items()]
    return p.InferenceResponse(output_tensors=tensors)


def error_response(error: BaseException):
    """INVALID_ARGUMENT for the client's mistakes, CANCELLED for cancellation, UNAVAILABLE when a
    stage's model is down (its process died, or it is being brought back), "resource exhausted"
    when the server is full (sent as UNAVAILABLE: the Python backend has no RESOURCE_EXHAUSTED; its
    message says it), INTERNAL otherwise.

    The message starts with the status in words too: gRPC stream responses carry only a message,
    so that prefix is how a streaming client tells the kinds apart. A refusal's message carries
    its reason code (api.refusal_message). Internal errors are logged with their traceback
    here and reach the client as one line.
    """
    p = pb()
    if isinstance(error, InvalidInput):
        code, message = p.TritonError.INVALID_ARG, api.refusal_message(error.reason, str(error))
    elif isinstance(error, Cancelled):
        code, message = p.TritonError.CANCELLED, f"cancelled: {error}"
    elif isinstance(error, ResourceExhausted):
        code, message = p.TritonError.UNAVAILABLE, api.resource_exhausted_message(str(error))
    elif isinstance(error, Unavailable):
        log.warning("unavailable: %s", error)  # a fault outside this code: no traceback
        code, message = p.TritonError.UNAVAILABLE, api.unavailable_message(str(error))
    else:
        log.error("internal error", exc_info=error)
        code, message = p.TritonError.INTERNAL, f"internal error: {type(error).__name__}: {error}"
    return p.InferenceResponse(error=p.TritonError(message, code))


def final_flag() -> int:
    return pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL


def is_cancelled(request) -> bool:
    try:
        return bool(request.is_cancelled())
    except Exception:  # older backends have no cancellation API
        return False


# ---- BLS: the stateless stages as calls to their Triton models ---------------------------------------
class BlsStages:
    """Blip2Service's stages as BLS calls to the `preprocess`, `vision_encoder` and `qformer` models.

    Each call is a separate Triton request, so calls from concurrent requests meet in those models'
    dynamic batchers. A stage's INVALID_ARGUMENT comes back as InvalidInput with its text and reason;
    a stage that cannot serve (its process died: Triton's "Stub process ... is not healthy"; or it is
    unloaded or loading while the server brings it back) as Unavailable.
    """

    def preprocess(self, image: bytes, prompt: bytes | None) -> tuple[np.ndarray, np.ndarray]:
        inputs = {api.IMAGE.name: np.asarray([[image]], dtype=object)}
        if prompt is not None:
            inputs[api.PROMPT.name] = np.asarray([[prompt]], dtype=object)
        out = _call(api.PREPROCESS, inputs, [specs.PIXEL_VALUES, api.PROMPT_IDS.name])
        return out[specs.PIXEL_VALUES][0], out[api.PROMPT_IDS.name][0]

    def query_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        image = _call(specs.VISION_ENCODER, {specs.PIXEL_VALUES: pixel_values[None]}, [specs.IMAGE_EMBEDS])
        return _call(specs.QFORMER, image, [specs.QUERY_EMBEDS])[specs.QUERY_EMBEDS][0]


class RetrievalBlsStages:
    """RetrievalService's stages as BLS calls to the retrieval checkpoint's stage models, one
    request each, so that concurrent calls meet in those models' dynamic batchers."""

    def pixel_values(self, image: bytes) -> np.ndarray:
        out = _call(api.RETRIEVAL_PREPROCESS, {api.IMAGE.name: np.asarray([[image]], dtype=object)}, [specs.PIXEL_VALUES])
        return out[specs.PIXEL_VALUES][0]

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        out = _call(specs.RETRIEVAL_VISION_ENCODER, {specs.PIXEL_VALUES: pixel_values[None]}, [specs.IMAGE_EMBEDS])
        return out[specs.IMAGE_EMBEDS][0]

    def image_features(self, image_embeds: np.ndarray) -> np.ndarray:
        out = _call(specs.IMAGE_FEATURES, {specs.IMAGE_EMBEDS: image_embeds[None]}, [specs.IMAGE_EMBEDS_PROJ])
        return out[specs.IMAGE_EMBEDS_PROJ][0]

    def text_features(self, input_ids: np.ndarray) -> np.ndarray:
        from .retrieval import text_inputs

        return _call(specs.TEXT_FEATURES, text_inputs(input_ids), [specs.TEXT_EMBEDS_PROJ])[specs.TEXT_EMBEDS_PROJ][0]

    def itm_logits(self, image_embeds: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
        from .retrieval import text_inputs

        inputs = {specs.IMAGE_EMBEDS: image_embeds[None], **text_inputs(input_ids)}
        return _call(specs.ITM, inputs, [specs.ITM_LOGITS])[specs.ITM_LOGITS][0]


def _call(model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    p = pb()
    request = p.InferenceRequest(
        model_name=model, inputs=[p.Tensor(n, v) for n, v in inputs.items()], requested_output_names=outputs,
    )
    result = request.exec()
    if result.has_error():
        error = result.error()
        message = error.message()
        code = error.code() if hasattr(error, "code") else None
        refusal = api.parse_refusal(message)
        # A stage's refusal does not always come back with INVALID_ARG through BLS: its own first
        # words mark it then (an internal error that quotes a refusal starts otherwise).
        if refusal is not None and (code in (None, p.TritonError.INVALID_ARG) or message.startswith("invalid argument")):
            raise InvalidInput(refusal.text, refusal.reason)
        if code == p.TritonError.INVALID_ARG:  # Triton's own input checks
            raise InvalidInput(message, api.Reason.INPUT)
        if api.is_resource_exhausted(message):  # the stage's queue is full
            raise ResourceExhausted(f"model {model!r}: {message}")
        if code in (p.TritonError.UNAVAILABLE, p.TritonError.NOT_FOUND) or api.is_unavailable(message):
            raise Unavailable(f"model {model!r}: {message}")
        raise RuntimeError(f"model {model!r}: {message}")
    return {n: p.get_output_tensor_by_name(result, n).as_numpy() for n in outputs}


# ---- metrics ------------------------------------------------------------------------------------
# A Metric dies with its MetricFamily, so families live as long as the process.
_FAMILIES: dict[str, object] = {}
# Metric updates from two threads of one stub at once crash tritonserver 2.51 (SIGSEGV in
# libtriton_python.so, seen with the image cache's updates from request threads beside the
# engine's): every update of the process goes through this lock.
_UPDATES = threading.Lock()


class _Metric:
    """A pb_utils Metric whose updates never overlap (see _UPDATES)."""

    def __init__(self, metric):
        self._metric = metric

    def increment(self, amount: float) -> None:
        with _UPDATES:
            self._metric.increment(amount)

    def set(self, value: float) -> None:
        with _UPDATES:
            self._metric.set(value)


def _metric(name: str, description: str, kind: str, labels: dict[str, str]):
    p = pb()
    with _UPDATES:
        if name not in _FAMILIES:
            _FAMILIES[name] = p.MetricFamily(name=name, description=description, kind=getattr(p.MetricFamily, kind))
        return _Metric(_FAMILIES[name].Metric(labels=labels))


def counter(name: str, description: str, labels: dict[str, str]):
    return _metric(name, description, "COUNTER", labels)


def gauge(name: str, description: str, labels: dict[str, str]):
    return _metric(name, description, "GAUGE", labels)


class EngineMetrics(EngineStats):
    """Engine events as Prometheus metrics on Triton's metrics endpoint (next to its own).

    Every metric update is a round trip from the stub to the server. The per-step
    counters (tokens, decoder calls, the seconds of TIMED_STAGES) therefore accumulate here and go
    out at `flush()`, called before a request's last answer (so a client that has its answer sees
    it counted), or every PUBLISH_EVERY_S during long generations. The active-sequences gauge changes only
    when a sequence joins or leaves and is set at once.
    """

    PUBLISH_EVERY_S = 0.25

    def __init__(self, model: str):
        super().__init__()
        labels = {"model": model}
        self._tokens = counter("blip2_generated_tokens_total", "Tokens generated", labels)
        self._requests = counter("blip2_prefills_total", "Sequences prefilled", labels)
        self._steps = counter("blip2_decode_steps_total", "Batched decoder calls", labels)
        self._ttft_sum = counter("blip2_time_to_first_token_seconds_sum", "Sum of times to first token", labels)
        self._ttft_count = counter("blip2_time_to_first_token_seconds_count", "Sequences timed to first token", labels)
        self._active = gauge("blip2_active_sequences", "Sequences being generated", labels)
        self._reserved = gauge("blip2_kv_cache_reserved_bytes",
                               "KV cache bytes the active sequences may reach at most (what the budget bounds)", labels)
        self._cache_bytes = gauge("blip2_kv_cache_bytes", "KV cache bytes allocated now", labels)
        self._waiting = gauge("blip2_waiting_requests",
                              "Requests received and not yet decoding (bounded by max_queue_size)", labels)
        self._stages = {
            stage: (counter(f"blip2_{stage}_seconds_sum", f"Seconds spent in {stage}", labels),
                    counter(f"blip2_{stage}_seconds_count", f"Timed runs of {stage}", labels))
            for stage in TIMED_STAGES}
        self._pending: dict = {}  # counter -> amount not yet published
        self._published = time.monotonic()

    def _add(self, metric, amount: float) -> None:
        self._pending[metric] = self._pending.get(metric, 0) + amount

    def on_prefill(self) -> None:
        super().on_prefill()
        self._requests.increment(1)

    def on_step(self, sequences: int) -> None:
        super().on_step(sequences)
        self._add(self._steps, 1)
        if time.monotonic() - self._published > self.PUBLISH_EVERY_S:
            self.flush()

    def on_tokens(self, count: int) -> None:
        super().on_tokens(count)
        self._add(self._tokens, count)

    def on_first_token(self, seconds: float) -> None:
        # Not kept in EngineStats' list: a server runs for weeks; the counters are the record.
        self._ttft_sum.increment(seconds)
        self._ttft_count.increment(1)

    def on_active(self, sequences: int) -> None:
        super().on_active(sequences)
        self._active.set(sequences)  # synchronous: done before the engine sends a token

    def on_waiting(self, requests: int) -> None:
        self._waiting.set(requests)

    def on_cache(self, reserved_bytes: int, allocated_bytes: int) -> None:
        self._reserved.set(reserved_bytes)
        self._cache_bytes.set(allocated_bytes)

    def on_stage(self, stage: str, seconds: float) -> None:
        total, count = self._stages[stage]
        self._add(total, seconds)
        self._add(count, 1)

    def flush(self) -> None:
        for metric, amount in self._pending.items():
            if amount:
                metric.increment(amount)
        self._pending.clear()
        self._published = time.monotonic()


class ImageCacheMetrics(ImageCacheStats):
    """The image cache's hits, misses, evictions and size on Triton's metrics endpoint. Updates
    are a few per image-stage run, far fewer than the engine's, so they go out at once."""

    def __init__(self, model: str):
        super().__init__()
        labels = {"model": model}
        self._hits = counter("blip2_image_cache_hits_total", "Requests whose image's query embeddings were cached", labels)
        self._misses = counter("blip2_image_cache_misses_total", "Requests that ran the image stages", labels)
        self._evictions = counter("blip2_image_cache_evictions_total", "Images dropped to keep the byte bound", labels)
        self._bytes = gauge("blip2_image_cache_bytes", "Bytes of query embeddings held", labels)
        self._entries = gauge("blip2_image_cache_entries", "Images held", labels)

    def on_hit(self) -> None:
        super().on_hit()
        self._hits.increment(1)

    def on_miss(self) -> None:
        super().on_miss()
        self._misses.increment(1)

    def on_evict(self, count: int) -> None:
        super().on_evict(count)
        self._evictions.increment(count)

    def on_size(self, nbytes: int, entries: int) -> None:
        super().on_size(nbytes, entries)
        self._bytes.set(nbytes)
        self._entries.set(entries)


def piece_sender(sender):
    """Blip2Service emit callback -> one decoupled response per piece, the last one flagged final."""
    def send(piece) -> None:
        resp = response({
            api.TEXT.name: np.asarray([piece.text.encode("utf-8")], dtype=object),
            api.TOKEN_IDS.name: np.asarray(piece.token_ids, np.int64),
            api.FINAL.name: np.asarray([piece.final]),
            api.PROMPT_TOKENS.name: np.asarray([piece.prompt_tokens], np.int32),
        })
        sender.send(resp, flags=final_flag() if piece.final else 0)

    return send


def error_sender(sender):
    def send(error: BaseException) -> None:
        sender.send(error_response(error), flags=final_flag())

    return send
