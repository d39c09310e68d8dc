"""Where the time of one request goes, stage by stage.

In process: LocalPipeline's parts (the served code without Triton), timed one by one, with the
generation engine driving a language-model wrapper that times every call (the first is the
prefill, the rest are decode steps). On the server: Triton's per-model statistics (queue and
compute times) and the `blip2` model's engine metrics, as differences between two snapshots.
"""
from __future__ import annotations

# Imports inside functions keep onnxruntime (in-process) and tritonclient (server) apart: a
# worker process or the bench driver loads only the side it measures.

import io
import statistics
import time
import urllib.request

import numpy as np

from blip2_triton import specs

from .records import EngineMetrics, ModelStats, ServerStages


class _TimedLanguageModel:
    """Stands in for the engine's LanguageModel and records how long each prefill and step takes."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[float] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _timed(self, call, *args):
        start = time.perf_counter()
        result = call(*args)
        self.calls.append(time.perf_counter() - start)
        return result

    def prefill(self, *args):
        return self._timed(self.inner.prefill, *args)

    def step(self, *args):
        return self._timed(self.inner.step, *args)


class LocalRunner:
    """The in-process pipeline (no Triton, no gRPC), as a benchmark worker hosts it."""

    kind = "local"

    def __init__(self, repository: str, threads: int):
        from blip2_triton.serving.pipeline import LocalPipeline

        self.pipe = LocalPipeline(repository, threads=threads)
        self.info = {"onnxruntime_intra_op_threads": threads}
        self._row_feeds = {}  # (rows, past_length) -> language-model step arguments; kept, as the benchmark calls round by round

    def generate(self, image: bytes, prompt: str, controls: dict) -> dict:
        """One request through LocalPipeline's parts (what LocalPipeline.__call__ does), timed stage
        by stage: seconds, time to first token, token ids, text and seconds per stage.

        The generation engine drives a language-model wrapper that times each call: the first is
        the prefill, the others are decode steps; engine_overhead is the rest of the engine's time
        (search, KV-cache bookkeeping).
        """
        pipe = self.pipe
        engine = pipe.generator.engine
        clock = time.perf_counter
        first: list[float] = []

        def on_tokens(ids, new, final):
            if not first:
                first.append(clock())

        t0 = clock()
        pixels, prompt_ids = pipe.stages.preprocess(image, prompt.encode("utf-8"))
        t1 = clock()
        image_embeds = pipe.stages.image_embeds(pixels)
        t2 = clock()
        query = pipe.stages.qformer(**{specs.IMAGE_EMBEDS: image_embeds})[specs.QUERY_EMBEDS][0]
        t3 = clock()
        timed = _TimedLanguageModel(engine.language_model)
        engine.language_model = timed
        try:
            request = pipe.generator.request(query, prompt_ids, controls, stream=True, on_tokens=on_tokens)
            tokens = [int(t) for t in engine.generate(request)]
        finally:
            engine.language_model = timed.inner
        t4 = clock()
        text = pipe.detokenizer.piece(tokens, len(tokens), final=True)
        t5 = clock()
        # What detokenization costs a streaming request: one piece per token (not timed as part of
        # this request, which is not streamed).
        for k in range(1, len(tokens) + 1):
            pipe.detokenizer.piece(tokens[:k], 1, final=k == len(tokens))
        t6 = clock()
        steps = timed.calls[1:]
        return {
            "seconds": t5 - t0,
            "ttft": first[0] - t0,
            "tokens": tokens,
            "text": text,
            "stages": {
                "preprocess": t1 - t0,
                "vision_encoder": t2 - t1,
                "qformer": t3 - t2,
                "prefill": timed.calls[0],
                "decode": sum(steps),
                "engine_overhead": (t4 - t3) - sum(timed.calls),
                "postprocess": t5 - t4,
                "total": t5 - t0,
                "decode_step_median": statistics.median(steps) if steps else None,
                "postprocess_streamed": t6 - t5,
            },
            "decode_steps": len(steps),
        }

    def decode_vs_rows(self, rows: list[int], past_length: int) -> list[dict]:
        """Seconds of one decode step for each of `rows` sequence counts, each row with
        `past_length` positions cached, one after the other: one round. The caller repeats rounds
        (each next to its own bandwidth probe), so a burst of load from other users hits every row
        count alike.
        """
        language_model = self.pipe.generator.language_model
        for n in rows:
            if (n, past_length) not in self._row_feeds:
                self._row_feeds[n, past_length] = self._rows_at(n, past_length)
                language_model.step(*self._row_feeds[n, past_length])  # warm-up for this shape, once
        # One untimed call first: right after the caller's pause (a bandwidth probe) the first call
        # runs markedly slower whatever its shape (cold cores, README: "Batched decoding"). Decode
        # steps in a request follow each other; so do the timed ones.
        language_model.step(*self._row_feeds[rows[0], past_length])
        steps = []
        for n in rows:
            start = time.perf_counter()
            language_model.step(*self._row_feeds[n, past_length])
            steps.append({"rows": n, "step_seconds": time.perf_counter() - start})
        return steps

    def _rows_at(self, rows: int, past_length: int) -> tuple:
        """Step arguments (tokens, lengths, cache) for `rows` caption requests `past_length` positions
        deep: each row prefilled through the language model as a request is (so an encoder-decoder
        LM's cross-attention keys and values are in its cache), the positions between its prefill
        and `past_length` left as the cache holds them. Every call writes position `past_length` of
        each row again: the cache stays the same size."""
        from PIL import Image

        picture = io.BytesIO()
        Image.new("RGB", (64, 64), (120, 80, 40)).save(picture, format="JPEG")
        pixels, prompt_ids = self.pipe.stages.preprocess(picture.getvalue(), b"")
        query = self.pipe.stages.query_embeds(pixels)
        language_model = self.pipe.generator.language_model
        cache = language_model.new_cache()
        for slot in range(rows):
            _, cached = language_model.prefill(query, prompt_ids, cache, slot)
        if past_length < cached:
            raise ValueError(f"past_length {past_length} is shorter than a prefill ({cached} positions)")
        return np.full(rows, 4, np.int64), np.full(rows, past_length, np.int64), cache


# ---- server side ---------------------------------------------------------------------------------

def triton_statistics(grpc_url: str, client=None) -> dict[str, dict]:
    """Cumulative per-model statistics (model name -> counts and nanosecond totals); `client`: an
    open tritonclient.grpc client to reuse (snapshots around every request)."""
    import tritonclient.grpc as grpcclient

    own = client is None
    client = client or grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = client.get_inference_statistics(as_json=True)
    finally:
        if own:
            client.close()
    out = {}
    for model in stats.get("model_stats", []):
        inference = model.get("inference_stats", {})
        entry = {
            "inference_count": int(model.get("inference_count", 0)),
            "execution_count": int(model.get("execution_count", 0)),
        }
        for part in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            entry[f"{part}_count"] = int(inference.get(part, {}).get("count", 0))
            entry[f"{part}_ns"] = int(inference.get(part, {}).get("ns", 0))
        out[model["name"]] = entry
    return out


def blip2_metrics(metrics_url: str) -> dict[str, float]:
    """The generator's own Prometheus metrics (blip2_*), summed over labels."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        body = response.read().decode()
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("blip2_"):
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
    return values


class PerWorkload:
    """Server-side statistics of single requests, summed per workload: Triton's statistics and the
    blip2_* metrics are read before and after each request (nothing else runs on the server
    meanwhile), so caption and VQA get breakdowns of their own instead of one pooled over both."""

    def __init__(self, grpc_url: str, metrics_url: str):
        import tritonclient.grpc as grpcclient

        self.grpc_url, self.metrics_url = grpc_url, metrics_url
        self.client = grpcclient.InferenceServerClient(grpc_url)
        self.stats: dict[str, dict] = {}
        self.metrics: dict[str, dict] = {}

    def reset(self) -> None:
        self.stats.clear()
        self.metrics.clear()

    def snapshot(self) -> tuple[dict, dict]:
        return triton_statistics(self.grpc_url, self.client), blip2_metrics(self.metrics_url)

    def add(self, workload: str, before: tuple[dict, dict], after: tuple[dict, dict]) -> None:
        stats, metrics = self.stats.setdefault(workload, {}), self.metrics.setdefault(workload, {})
        for model, end in after[0].items():
            start, total = before[0].get(model, {}), stats.setdefault(model, {})
            for k, v in end.items():
                total[k] = total.get(k, 0) + v - start.get(k, 0)
        for k, v in after[1].items():
            metrics[k] = metrics.get(k, 0.0) + v - before[1].get(k, 0.0)

    def result(self) -> dict[str, ServerStages]:
        """workload -> server_stages() over that workload's requests."""
        return {w: server_stages({}, self.stats[w], {}, self.metrics[w]) for w in self.stats}

    def close(self) -> None:
        self.client.close()


def server_stages(before: dict, after: dict, metrics_before: dict, metrics_after: dict) -> ServerStages:
    """Per-request milliseconds per served model between two snapshots.

    For batched models, queue and compute are per request (a batch's compute time is counted
    for each of its requests). `blip2` is decoupled: its execute() only hands off, so its
    compute time says nothing; its engine reports the rest through the blip2_* metrics: time to
    first token (from execute() receiving the request), the prefill, each decode step and each
    detokenization (mean ms per run, and runs per request).
    """
    models = {}
    for name, end in after.items():
        start = before.get(name, {})
        diff = {k: v - start.get(k, 0) for k, v in end.items()}
        requests = diff["success_count"]
        if not requests:
            continue

        def per(part: str, diff=diff) -> float:
            return diff[f"{part}_ns"] / max(diff[f"{part}_count"], 1) / 1e6

        models[name] = ModelStats(
            requests=requests, executions=diff["execution_count"],
            mean_batch=round(diff["inference_count"] / diff["execution_count"], 2) if diff["execution_count"] else None,
            queue_ms=per("queue"), compute_input_ms=per("compute_input"), compute_infer_ms=per("compute_infer"),
            compute_output_ms=per("compute_output"), request_ms=per("success"))
    delta = {k: metrics_after.get(k, 0.0) - metrics_before.get(k, 0.0) for k in metrics_after}

    def mean_ms(metric: str) -> float | None:
        count = delta.get(f"{metric}_seconds_count", 0.0)
        return round(delta[f"{metric}_seconds_sum"] / count * 1e3, 4) if count else None

    count = lambda name: int(round(delta[name])) if name in delta else None  # noqa: E731 - counters are floats
    prefills = count("blip2_prefills_total")
    generator = EngineMetrics(
        generated_tokens=count("blip2_generated_tokens_total"), decode_steps=count("blip2_decode_steps_total"),
        prefills=prefills, engine_ttft_ms=mean_ms("blip2_time_to_first_token"), prefill_ms=mean_ms("blip2_prefill"),
        decode_step_ms=mean_ms("blip2_decode_step"), detokenize_ms=mean_ms("blip2_detokenize"),
        detokenize_per_request=(round(delta.get("blip2_detokenize_seconds_count", 0.0) / prefills, 3)
                                if prefills else None))
    return ServerStages(models=models, generator_metrics=generator)
