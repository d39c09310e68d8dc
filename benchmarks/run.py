"""`blip2-triton bench`: latency, throughput and memory of the served pipeline, side by side with
transformers' generate(), in one run.

    blip2-triton bench                                # base-opt, base-t5 (+ the trained tiny model if present)
    blip2-triton bench --model tiny-opt --quick       # what CI's smoke test runs

Per model it: counts what each stage's graphs compute and read; starts the real tritonserver and
the worker processes (transformers, and the in-process LocalPipeline in fp32 and int8); sends each
workload's requests to all of them in turn (so machine load hits them alike); times every stage in
process and reads the server's own statistics; times decoder calls alone against the bandwidth of
their moment; sweeps concurrent client streams; samples the server's memory; optionally runs
perf_analyzer. The machine (bandwidth, matmul rate) is measured at the start and the end, and the
floors follow from the best of both. Results go to `--output` as JSON (raw numbers; the records of
records.py), a markdown table and PNG plots.
"""
from __future__ import annotations

# Imports inside functions are deliberate: the CLI imports this module for its arguments, and the
# measuring modules pull in torch, tritonclient, onnxruntime and matplotlib.

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from blip2_triton.progress import Progress

from .records import (
    INT8, IMAGE_STAGES, BaselineBatch, BatchStats, Batching, BenchResults, DecodeRound, DecodeVsRows, EndToEnd,
    GraphCost, Int8Agreement, Memory, ModelResult, PerfAnalyzer, RowStep, Stages, StageFloor, StageFloors,
    StageMedians, Summary, ServerStages, ThroughputBound, ThroughputLevel, TokenIdentity, WorkloadLatency,
)
from .tables import ratio

log = logging.getLogger("blip2_triton.bench")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results"
DEFAULT_WORKDIR = ROOT / "artifacts" / "bench"


@dataclass(frozen=True)
class Settings:
    """How much of everything to run; --quick shrinks it for the smoke test."""

    threads: int = 2
    caption_tokens: int = 30
    vqa_tokens: int = 10
    images: int = 4
    warmup: int = 2
    reps: int = 30  # interleaved requests per workload and system (a p99 of 30 is their 2nd slowest)
    stream_reps: int = 10
    # transformers at other thread counts too (interleaved with the rest): shows how much of its
    # time is lost to OpenMP threads waiting for cores that other processes hold
    extra_baseline_threads: tuple[int, ...] = (1,)
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    requests_per_stream: int = 5
    baseline_batches: tuple[int, ...] = (1, 4, 16)
    decode_rows: tuple[int, ...] = (1, 2, 4, 8, 16)
    decode_rounds: int = 15  # rounds of the decode-vs-rows measurement, each next to a bandwidth probe
    bandwidth_mib: int = 512
    matmul_n: int = 2048
    # Also the same graphs with int8 weights (`export --quantize int8`), in process, in the same turns.
    int8: bool = True
    # A request is "quiet" when other users' processes kept fewer cores than this busy meanwhile.
    quiet_cores: float = 0.25
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> "Settings":
        base = dict(warmup=1, reps=2, stream_reps=1, extra_baseline_threads=(), concurrency=(1, 2), requests_per_stream=1,
                    baseline_batches=(2,), decode_rows=(1, 2), decode_rounds=3, bandwidth_mib=128, matmul_n=1024, caption_tokens=8, vqa_tokens=4,
                    images=2)
        return cls(**(base | overrides))


# ---- one model --------------------------------------------------------------------------------

def baseline_name(threads: int) -> str:
    return f"transformers_{threads}_thread{'s' if threads != 1 else ''}"


def bench_model(spec: str, settings: Settings, args, progress: Progress, cross_check: bool = True) -> ModelResult:
    """Every measurement of one model (its floors are added once the run's machine measurements are in);
    `cross_check`: run perf_analyzer too, when --perf-analyzer asks for it."""
    from blip2_triton import repository, specs

    from . import machine, perf_analyzer
    from .workloads import images as make_images
    from .workloads import prepare_model, workloads

    t_model = time.perf_counter()
    workdir = Path(args.workdir)
    progress.say(f"[{spec}] preparing checkpoint and model repository under {workdir}")
    model = prepare_model(spec, workdir, rebuild=args.rebuild, seed=settings.seed, int8=settings.int8)
    logs = workdir / model.name / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    loads = workloads(settings.caption_tokens, settings.vqa_tokens)
    pictures = make_images(settings.images)
    costs, past = graph_costs(model, loads)
    decoder = lambda repo: machine.decoder_weights(repository.graph_path(repo, specs.LLM_DECODER))  # noqa: E731
    found: dict = {"model": model.as_dict(), "workloads": [asdict(w) for w in loads],
                   "decoder_weights": decoder(model.repository),
                   "decoder_weights_int8": decoder(model.int8_repository) if model.int8_repository else None,
                   "graph_costs": costs}

    progress.say(f"[{spec}] starting workers (transformers, in-process) and tritonserver")
    t_start = time.perf_counter()
    with _Systems(model, settings, logs) as systems:
        server, workers = systems.server, systems.workers
        found["server_threads_env"] = systems.threads_env()
        found["startup_seconds"] = {"tritonserver": server.startup_seconds} | {
            f"{name}_load": w.info["load_seconds"] for name, w in workers.items()}
        found["baseline_info"] = workers["transformers"].info
        progress.say(f"[{spec}] all up in {time.perf_counter() - t_start:.1f}s")
        for worker in workers.values():
            worker.send_images(pictures)
        loop = asyncio.new_event_loop()
        try:
            found |= _measure(_Turns(loop, server, workers, pictures), loads, settings, past, progress)
            if args.perf_analyzer and cross_check:
                progress.say(f"[{spec}] perf_analyzer cross-check")
                found["perf_analyzer"] = PerfAnalyzer.from_dict(perf_analyzer.run(
                    server.grpc_url, pictures[0], loads[0], logs, args.perf_analyzer_concurrency))
            else:
                found["perf_analyzer"] = PerfAnalyzer(skipped="run with --perf-analyzer" if not args.perf_analyzer else
                                                      "the cross-check runs against the first model's server only")
        finally:
            loop.close()
        progress.say(f"[{spec}] stopping")
        found["memory"] = systems.memory()
    return ModelResult(**found, seconds=round(time.perf_counter() - t_model, 1))


class _Systems:
    """The systems under test, alive side by side for a model's whole run: tritonserver (every served
    onnxruntime session at the benchmark's threads), the in-process pipeline (fp32, int8) and
    transformers workers, and a sampler of the server's memory."""

    def __init__(self, model, settings: Settings, logs: Path):
        self.model, self.settings, self.logs = model, settings, logs
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> "_Systems":
        from blip2_triton.server.launcher import TritonServer
        from blip2_triton.serving.onnx_graph import THREADS_ENV

        from . import end_to_end
        from .worker import Worker

        from .workloads import configure_image_cache

        model, threads, logs = self.model, self.settings.threads, self.logs
        configure_image_cache(model, None)
        with self.stack as stack:
            # Workers load while tritonserver starts.
            self.workers = {"in_process": Worker("local", model.repository, threads, logs / "in_process.log")}
            if model.int8_repository:
                self.workers[INT8] = Worker("local", model.int8_repository, threads, logs / f"{INT8}.log")
            self.workers["transformers"] = Worker("transformers", model.checkpoint, threads, logs / "transformers.log")
            for n in self.settings.extra_baseline_threads:
                self.workers[baseline_name(n)] = Worker("transformers", model.checkpoint, n,
                                                        logs / f"{baseline_name(n)}.log")
            for worker in self.workers.values():
                stack.enter_context(worker)
            self.server = stack.enter_context(TritonServer(
                model.repository, grpc_port=None, http_port=None, metrics_port=None,
                log_file=logs / "tritonserver.log", startup_timeout=600, env={THREADS_ENV: str(threads)}))
            self.sampler = end_to_end.GroupMemorySampler(self.server.pgid).start()
            stack.callback(self.sampler.stop)
            self.stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def threads_env(self) -> dict[str, str | None]:
        """What the served models' processes really received, read back from /proc."""
        from blip2_triton.server.launcher import model_stub_pids
        from blip2_triton.serving.onnx_graph import THREADS_ENV

        return {name: _environment(pid).get(THREADS_ENV) for name, pid in model_stub_pids(self.server.pgid).items()}

    def memory(self) -> Memory:
        from .server_memory import snapshot

        pss = self.sampler.pss()
        processes = snapshot(self.server.pgid)
        self.sampler.stop()
        mib = lambda sizes: {k: round(v / 2**20, 1) for k, v in sorted(sizes.items())}  # noqa: E731
        return Memory(
            server_peak_rss_mib=round(self.sampler.peak_total / 2**20, 1),
            server_peak_rss_by_process_mib=mib(self.sampler.peak_by_process),
            server_pss_at_end_mib=round(sum(pss.values()) / 2**20, 1) if pss else None,
            server_pss_by_process_mib=mib(pss), server_samples=self.sampler.samples, server_processes=processes,
            workers_peak_rss_mib={name: round(w.call("memory")["peak_rss_mib"], 1) for name, w in self.workers.items()},
            note="server: sum over tritonserver and its stubs, sampled every 0.25 s (shared pages are "
                 "counted once per process; PSS splits them); workers: their own peak (VmHWM)")


def _environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").partition("=")[::2] for e in entries if b"=" in e)


class _Turns:
    """Timed calls to every system, each with the CPU other users' processes took meanwhile; the
    server's statistics are summed per workload around its single requests."""

    def __init__(self, loop, server, workers: dict, pictures: list[bytes]):
        from blip2_triton import api
        from blip2_triton.client import AsyncBlip2Client

        from . import end_to_end, stages
        from .machine import CpuMeter

        self.loop, self.server, self.workers, self.pictures = loop, server, workers, pictures
        self.meter = CpuMeter()
        self.per_workload = stages.PerWorkload(server.grpc_url, server.metrics_url)
        self.systems = ["server", *workers]
        self.start = time.perf_counter()

        async def connect():  # a grpc.aio channel belongs to the loop it is created on
            client = AsyncBlip2Client(server.grpc_url, timeout=600)
            streamer = end_to_end.stream_client(server.grpc_url)
            await client.is_ready()
            await streamer.is_model_ready(api.PIPELINE)
            return client, streamer

        self.client, self.streamer = self.run(connect())

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def measured(self, fn) -> dict:
        """fn()'s result plus how many cores other users' processes, and ours, kept busy meanwhile."""
        before = self.meter.snapshot()
        r = fn()
        after = self.meter.snapshot()
        r["others_cores"] = self.meter.others_cores(before, after)
        r["our_cores"] = self.meter.our_cores(before, after)
        return r

    def call(self, system: str, workload, image: int) -> dict:
        """One single request of `workload` on `image` to `system`, timed."""
        from . import end_to_end

        started = time.perf_counter() - self.start
        if system == "server":
            before = self.per_workload.snapshot()
            r = self.measured(lambda: self.run(end_to_end.request(self.client, self.pictures[image], workload)))
            self.per_workload.add(workload.name, before, self.per_workload.snapshot())
        else:
            r = self.measured(lambda: self.workers[system].call("generate", image=image, prompt=workload.prompt,
                                                                controls=workload.controls))
        return r | {"image": image, "started": started}

    def close(self) -> None:
        self.per_workload.close()
        self.run(self.client.close())
        self.run(self.streamer.close())


def _measure(turns: _Turns, loads, settings: Settings, past: int, progress: Progress) -> dict:
    """The measured sections of ModelResult, phase after phase."""
    try:
        _warm_up(turns, loads, settings, progress)
        samples = _single_requests(turns, loads, settings, progress)
        server_stages = turns.per_workload.result()
        streams = _streams(turns, loads, settings, progress)
        decode = _decode_vs_rows(turns.workers, settings, past, progress)
        throughput = _throughput(turns, loads[0], settings, progress)
        baseline_batches = _baseline_batches(turns, loads[0], settings, progress)
    finally:
        turns.close()
    systems = turns.systems
    medians = _stage_medians(loads, samples)
    steps = {d.rows: d.step_ms / 1e3 for d in decode.by_system["in_process"]}
    return {
        "systems": systems,
        "throughput_bound": _throughput_bound(medians[loads[0].name], loads[0].max_new_tokens, steps, throughput),
        "raw": _raw(loads, samples, streams),
        "end_to_end": EndToEnd(workloads={w.name: WorkloadLatency.of(samples[w.name], streams[w.name],
                                                                     settings.quiet_cores) for w in loads}),
        "tokens_identical": _identical(loads, samples, streams, systems),
        "int8_agreement": _int8_agreement(loads, samples) if INT8 in systems else None,
        "stages": Stages(in_process=medians, server=server_stages, decode=decode),
        "throughput": throughput,
        "baseline_batches": baseline_batches,
    }


def _warm_up(turns: _Turns, loads, settings: Settings, progress: Progress) -> None:
    """First calls pay for lazy initialisation (thread pools, allocator growth); they do not count."""
    bar = progress.phase("warm-up", settings.warmup * len(loads) * len(turns.systems))
    for k in range(settings.warmup):
        for w in loads:
            for system in turns.systems:
                turns.call(system, w, k % len(turns.pictures))
                bar.update()
    bar.close()
    turns.per_workload.reset()


def _single_requests(turns: _Turns, loads, settings: Settings, progress: Progress) -> dict[str, dict[str, list]]:
    """Interleaved single requests -> workload -> system -> timed calls. The systems take turns
    (rotating order), so load from other users of the machine falls on all of them alike."""
    systems = turns.systems
    samples = {w.name: {s: [] for s in systems} for w in loads}
    bar = progress.phase(f"latency ({', '.join(systems)} in turns)", settings.reps * len(loads) * len(systems))
    for rep in range(settings.reps):
        order = systems[rep % len(systems):] + systems[:rep % len(systems)]
        for w in loads:
            for system in order:
                samples[w.name][system].append(turns.call(system, w, rep % len(turns.pictures)))
                bar.update()
    bar.close()
    return samples


def _streams(turns: _Turns, loads, settings: Settings, progress: Progress) -> dict[str, list[dict]]:
    """Streaming requests through the server (time to first token) -> workload -> timed calls."""
    from . import end_to_end

    streams = {w.name: [] for w in loads}
    bar = progress.phase("streaming through the server (time to first token)", settings.stream_reps * len(loads))
    for rep in range(settings.stream_reps):
        image = rep % len(turns.pictures)
        for w in loads:
            r = turns.measured(lambda: turns.run(end_to_end.stream(turns.streamer, turns.pictures[image], w)))
            streams[w.name].append(r | {"image": image})
            bar.update()
    bar.close()
    return streams


def _decode_vs_rows(workers: dict, settings: Settings, past: int, progress: Progress) -> DecodeVsRows:
    """Decoder calls alone at each row count, in rounds that each follow a bandwidth probe."""
    from . import machine

    by_system, all_rounds = {}, {}
    probe = machine.BandwidthProbe(settings.bandwidth_mib)
    for system in ("in_process", INT8):
        if system not in workers:
            continue
        bar = progress.phase(f"decode step vs rows {list(settings.decode_rows)}, next to a bandwidth probe "
                             f"({system})", settings.decode_rounds)
        rounds = []
        for _ in range(settings.decode_rounds):
            gbps = probe.read_gbps()
            steps = workers[system].call("decode_vs_rows", rows=list(settings.decode_rows), past_length=past)
            rounds.append(DecodeRound(read_gbps=round(gbps, 2),
                                      step_ms={d["rows"]: round(d["step_seconds"] * 1e3, 4) for d in steps}))
            bar.update()
        bar.close()
        all_rounds[system] = rounds
        medians = {n: statistics.median(r.step_ms[n] for r in rounds) for n in settings.decode_rows}
        by_system[system] = [RowStep(rows=n, step_ms=round(ms, 3), ms_per_token=round(ms / n, 3))
                             for n, ms in medians.items()]
    return DecodeVsRows(by_system=by_system, decode_step_rounds=all_rounds, decode_step_past_length=past)


def _throughput(turns: _Turns, caption, settings: Settings, progress: Progress) -> list[ThroughputLevel]:
    """Captions from N closed-loop client streams at each concurrency level."""
    from . import end_to_end, stages

    levels = []
    total = sum(c * settings.requests_per_stream for c in settings.concurrency)
    bar = progress.phase(f"throughput vs concurrent streams {list(settings.concurrency)}", total)
    for streams in settings.concurrency:
        before = turns.per_workload.snapshot()
        r = turns.measured(lambda: turns.run(end_to_end.closed_loop(
            turns.server.grpc_url, streams, settings.requests_per_stream, turns.pictures, caption)))
        after = turns.per_workload.snapshot()
        level = stages.server_stages(before[0], after[0], before[1], after[1])
        latencies = r.pop("latencies")
        r = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        levels.append(ThroughputLevel(**r, server=_batching(level), latency_ms=Summary.of(latencies)))
        bar.update(streams * settings.requests_per_stream)
    bar.close()
    return levels


def _baseline_batches(turns: _Turns, caption, settings: Settings, progress: Progress) -> list[BaselineBatch]:
    """transformers' static batching: one generate() over N images."""
    batches = []
    bar = progress.phase(f"transformers static batches {list(settings.baseline_batches)}", len(settings.baseline_batches))
    for n in settings.baseline_batches:
        r = turns.measured(lambda: turns.workers["transformers"].call(
            "batch", images=[i % len(turns.pictures) for i in range(n)], prompt=caption.prompt,
            controls=caption.controls))
        batches.append(BaselineBatch(batch=n, seconds=round(r["seconds"], 4), tokens=r["tokens"],
                                     requests_per_s=round(n / r["seconds"], 4),
                                     tokens_per_s=round(r["tokens"] / r["seconds"], 4), others_cores=r["others_cores"]))
        bar.update()
    bar.close()
    return batches


# ---- records from the timed calls ---------------------------------------------------------------

def _throughput_bound(stages_ms: StageMedians, tokens: int, step_seconds: dict[int, float],
                      throughput: list[ThroughputLevel], rows: int = 8) -> ThroughputBound:
    """Requests/s the machine could serve if no core ever idled: 1 / the CPU time one request costs.

    Every in-process stage runs with one thread per core, so its median time is the whole machine's
    time for it: preprocess + vision + Q-Former + prefill once, plus `tokens` decode steps at the
    per-token cost of a `rows`-sequence batch (what continuous batching at that concurrency buys).
    """
    per_token = {n: s / n for n, s in step_seconds.items()}
    at = max((r for r in per_token if r <= rows), default=min(per_token))
    once = stages_ms.preprocess_ms + stages_ms.vision_encoder_ms + stages_ms.qformer_ms + stages_ms.prefill_ms
    cost_ms = once + tokens * per_token[at] * 1e3
    bound = 1e3 / cost_ms
    level = next((t for t in throughput if t.streams == rows), None)
    return ThroughputBound(rows=at, once_ms=round(once, 3), decode_ms_per_token=round(per_token[at] * 1e3, 3),
                           request_cost_ms=round(cost_ms, 3), bound_requests_per_s=round(bound, 4), streams=rows,
                           measured_requests_per_s=level.requests_per_s if level else None,
                           measured_over_bound=round(level.requests_per_s / bound, 4) if level else None)


def _batching(level: ServerStages) -> Batching:
    """How the server batched at one concurrency level: each image stage's mean batch, queue and
    compute per request, and the continuous batcher's mean rows per decode step."""
    g = level.generator_metrics
    rows = ((g.generated_tokens - g.prefills) / g.decode_steps) if g.decode_steps else None
    return Batching(decode_rows_per_step=round(rows, 2) if rows else None,
                    models={k: BatchStats(mean_batch=v.mean_batch, queue_ms=round(v.queue_ms, 2),
                                          compute_infer_ms=round(v.compute_infer_ms, 2))
                            for k, v in level.models.items() if k in IMAGE_STAGES})


def _raw(loads, samples, streams) -> dict:
    """Every timed request (no token ids; their identity is summarised separately), in order."""
    def one(r: dict) -> dict:
        out = {"started_s": round(r["started"], 3) if "started" in r else None, "image": r["image"],
               "seconds": round(r["seconds"], 5), "ttft_s": round(r["ttft"], 5) if r.get("ttft") else None,
               "tokens": len(r["tokens"]), "others_cores": r.get("others_cores")}
        if r.get("inter_token"):
            out["inter_token_median_s"] = round(statistics.median(r["inter_token"]), 5)
        if "stages" in r:
            out["stages_s"] = {k: round(v, 5) for k, v in r["stages"].items() if v is not None}
        return out

    return {w.name: {**{system: [one(r) for r in runs] for system, runs in samples[w.name].items()},
                     "server_stream": [one(r) for r in streams[w.name]]} for w in loads}


def _identical(loads, samples, streams, systems) -> TokenIdentity:
    """Do the server (one-shot and streamed), the in-process pipeline (and transformers at other
    thread counts) produce exactly the token ids transformers generates for the same request?"""
    compared, mismatches = 0, []
    for w in loads:
        reference = {r["image"]: r["tokens"] for r in samples[w.name]["transformers"]}
        candidates = [(s, r["image"], r["tokens"]) for s in systems if s not in ("transformers", INT8)
                      for r in samples[w.name][s]]
        candidates += [("server_stream", r["image"], r["tokens"]) for r in streams[w.name]]
        for system, image, tokens in candidates:
            if image not in reference:
                continue
            compared += 1
            if tokens != reference[image]:
                mismatches.append({"workload": w.name, "system": system, "image": image,
                                   "ours": tokens, "transformers": reference[image]})
    distinct = len({t for w in loads for r in samples[w.name]["transformers"] for t in r["tokens"]})
    return TokenIdentity(all=not mismatches, compared=compared, mismatches=mismatches,
                         distinct_tokens_in_reference=distinct)


def _int8_agreement(loads, samples) -> Int8Agreement:
    """How close int8 weights stay to fp32: requests whose tokens equal transformers' fp32 tokens,
    and the mean share of tokens that agree before the first difference."""
    same = compared = 0
    prefix = []
    for w in loads:
        reference = {r["image"]: r["tokens"] for r in samples[w.name]["transformers"]}
        for r in samples[w.name][INT8]:
            ref = reference.get(r["image"])
            if ref is None:
                continue
            compared += 1
            same += r["tokens"] == ref
            agree = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref)) if a != b), min(len(ref), len(r["tokens"])))
            prefix.append(agree / max(len(ref), 1))
    return Int8Agreement(compared=compared, identical=same,
                         mean_agreeing_prefix=round(statistics.mean(prefix), 4) if prefix else None)


def _stage_medians(loads, samples) -> dict[str, StageMedians]:
    """Median per stage (ms) over the interleaved in-process requests."""
    out = {}
    for w in loads:
        runs = samples[w.name]["in_process"]
        keys = [k for k, v in runs[0]["stages"].items() if v is not None]
        medians = {f"{k}_ms": round(statistics.median(r["stages"][k] for r in runs) * 1e3, 3) for k in keys}
        out[w.name] = StageMedians(**medians, tokens=len(runs[0]["tokens"]), decode_steps=runs[0]["decode_steps"])
    return out


# ---- costs and floors ---------------------------------------------------------------------------

def graph_costs(model, loads) -> tuple[dict[str, GraphCost], int]:
    """What each stage's graph runs compute and read at the shapes one request of each workload
    feeds them (batch 1; the prompt tokenized as served): the vision encoder, the Q-Former, each
    workload's prefill, and a decode step in the middle of a caption (fp32 and int8), whose
    self-attention depth (positions cached before it) is returned too."""
    from blip2_triton import repository, specs
    from blip2_triton.serving.preprocess import Preprocessor
    from transformers import AutoConfig

    from . import flops

    repo = model.repository
    preprocessor = Preprocessor(repository.assets_dir(repo))
    queries = AutoConfig.from_pretrained(repository.assets_dir(repo)).num_query_tokens
    prompts = {w.name: len(preprocessor.prompt_ids(w.prompt)) for w in loads}
    costs = {graph: flops.graph_cost(repository.graph_path(repo, graph), {specs.BATCH: 1})
             for graph in (specs.VISION_ENCODER, specs.QFORMER)}
    for w in loads:
        costs[f"prefill:{w.name}"] = flops.prefill_cost(repo, queries, prompts[w.name])
    caption = loads[0]
    past = flops.prefill_positions(repo, queries, prompts[caption.name]) + caption.max_new_tokens // 2
    costs["decode_step"] = flops.decode_step_cost(repo, queries, prompts[caption.name], past)
    if model.int8_repository:
        costs["decode_step:int8"] = flops.decode_step_cost(model.int8_repository, queries, prompts[caption.name], past)
    return costs, past


STAGE_GRAPHS = {"vision_encoder": "vision_encoder", "qformer": "qformer", "prefill": "prefill:{workload}"}


def add_floors(result: ModelResult, caps) -> None:
    """The floors of `result`'s decode step (fp32, int8; over the best measured machine and round by
    round) and of its other stages, once the machine is measured at the end of the run."""
    from . import flops, machine

    costs = result.graph_costs
    result.floor = flops.decode_floor(costs["decode_step"], caps.read_gbps, caps.matmul_gflops)
    if "decode_step:int8" in costs:
        result.floor_int8 = flops.decode_floor(costs["decode_step:int8"], caps.read_gbps, caps.matmul_gflops)
    result.stage_floors = stage_floors(result, caps)
    result.floor_side_by_side = {
        system: machine.side_by_side(costs["decode_step:int8" if system == INT8 else "decode_step"].bytes_read, rounds)
        for system, rounds in result.stages.decode.decode_step_rounds.items()}


def stage_floors(result: ModelResult, caps) -> StageFloors:
    """Per workload and stage (vision encoder, Q-Former, prefill): the floor of its graph runs (FLOPs
    at the measured matmul rate, bytes at the measured bandwidth, the larger of the two), and
    measured / floor in process (median) and on the server (Triton's compute time, the engine's
    prefill metric; means over the workload's requests)."""
    from . import flops

    out = {}
    for w, inproc in result.stages.in_process.items():
        server = result.stages.server.get(w)
        models = server.models if server else {}
        served = {"vision_encoder": models["vision_encoder"].compute_infer_ms if "vision_encoder" in models else None,
                  "qformer": models["qformer"].compute_infer_ms if "qformer" in models else None,
                  "prefill": server.generator_metrics.prefill_ms if server else None}
        out[w] = {}
        for stage, graph in STAGE_GRAPHS.items():
            f = flops.floor(result.graph_costs[graph.format(workload=w)], caps.read_gbps, caps.matmul_gflops)
            ours = getattr(inproc, f"{stage}_ms")
            out[w][stage] = StageFloor(**f, in_process_ms=ours, server_ms=served[stage] and round(served[stage], 3),
                                       in_process_over_floor=ratio(ours, f["floor_ms"]),
                                       server_over_floor=ratio(served[stage], f["floor_ms"]))
    return StageFloors(workloads=out)


# ---- the command --------------------------------------------------------------------------------

def default_models() -> list[str]:
    from blip2_triton.toy.embedded import TRAINED_MODEL

    models = ["base-opt", "base-t5"]
    if (TRAINED_MODEL / "model.safetensors").exists():
        models.append(str(TRAINED_MODEL))
    return models


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", dest="models", metavar="PRESET_OR_DIR",
                   help="a preset (base-opt, base-t5, tiny-opt, ...) or a checkpoint directory; repeatable "
                        "(default: base-opt, base-t5, and the trained tiny model when present)")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT), help="where bench.json, bench.md and the PNGs go")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="scratch: checkpoints, exported repositories, logs")
    p.add_argument("--quick", action="store_true", help="minimal repetitions (smoke test), small token counts")
    p.add_argument("--threads", type=int,
                   help="torch, in-process onnxruntime and the served decoder's threads (default: usable cores)")
    p.add_argument("--reps", type=int, help="interleaved requests per workload and system")
    p.add_argument("--concurrency", help="comma-separated client stream counts, e.g. 1,2,4,8,16")
    p.add_argument("--requests-per-stream", type=int)
    p.add_argument("--baseline-batches", help="comma-separated transformers static batch sizes")
    p.add_argument("--caption-tokens", type=int)
    p.add_argument("--perf-analyzer", action="store_true",
                   help="also run perf_analyzer (from .venv-perf, created on first use) against the first model's server")
    p.add_argument("--perf-analyzer-concurrency", default="1:8:7", help="perf_analyzer --concurrency-range")
    p.add_argument("--rebuild", action="store_true", help="rebuild checkpoints and re-export even if cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def settings_from(args) -> Settings:
    overrides = {}
    threads = args.threads or len(os.sched_getaffinity(0))
    overrides["threads"] = threads
    if args.reps:
        overrides["reps"] = args.reps
    if args.concurrency:
        overrides["concurrency"] = tuple(int(x) for x in args.concurrency.split(","))
    if args.requests_per_stream:
        overrides["requests_per_stream"] = args.requests_per_stream
    if args.baseline_batches:
        overrides["baseline_batches"] = tuple(int(x) for x in args.baseline_batches.split(","))
    if args.caption_tokens:
        overrides["caption_tokens"] = args.caption_tokens
    return Settings.quick(**overrides) if args.quick else Settings(**overrides)


def run_from_args(args) -> int:
    from . import machine, report

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = settings_from(args)
    progress = Progress("bench", not args.quiet)
    start = time.perf_counter()
    models = args.models or default_models()
    progress.say(f"blip2-triton bench: models {models}, {settings.threads} threads, output {args.output}")
    facts = machine.facts(settings.threads, ROOT)
    progress.say("measuring memory bandwidth and matmul rate")
    first = machine.measure(settings.threads, array_mib=settings.bandwidth_mib, matmul_n=settings.matmul_n)
    results = {}
    for index, spec in enumerate(models):
        # perf_analyzer checks the benchmark's own client measurements, which do not depend on the
        # model: once per run is enough, and it costs minutes per model.
        result = bench_model(spec, settings, args, progress, cross_check=index == 0)
        results[result.model["name"]] = result
    # Measured again at the end: the best of both is the least disturbed by other load, and the
    # floor must be a lower bound.
    progress.say("measuring memory bandwidth and matmul rate again")
    last = machine.measure(settings.threads, array_mib=settings.bandwidth_mib, matmul_n=settings.matmul_n)
    caps = first.best(last)
    for result in results.values():
        add_floors(result, caps)
    facts["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    bench = BenchResults(
        about="blip2-triton bench: one run, all systems side by side; times in ms unless named otherwise",
        command=getattr(args, "command_line", None) or " ".join(["blip2-triton", *sys.argv[1:]]),
        facts=facts, settings=asdict(settings), models=results,
        capabilities=caps.as_dict() | {"at_start": first.as_dict(), "at_end": last.as_dict()},
        run_seconds=round(time.perf_counter() - start, 1))
    progress.say("writing results")
    paths = report.write(bench.to_dict(), Path(args.output))
    if not args.quiet:
        print(report.markdown(bench.to_dict()), file=sys.stderr)
    progress.say("wrote " + ", ".join(str(p) for p in paths) + f" in {bench.run_seconds:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip2-triton bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = " ".join(["blip2-triton bench", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
