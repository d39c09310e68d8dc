"""`blip2-triton bench`: latency, throughput and memory of the served pipeline, side by side with
transformers' generate(), in one run.

    blip2-triton bench                                # base-opt (+ the trained tiny model if present)
    blip2-triton bench --model tiny-opt --quick       # what CI's smoke test runs

Per model it: measures the machine (bandwidth, matmul rate) and the decode-step floor they imply;
starts the real tritonserver and two worker processes (transformers, and the in-process
LocalPipeline); sends each workload's requests to all three in turn (so machine load hits them
alike); times every stage in process and reads the server's own statistics; sweeps concurrent
client streams; samples the server's memory; optionally runs perf_analyzer. Results go to
`--output` as JSON (raw numbers), a markdown table and PNG plots.
"""
from __future__ import annotations

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

import numpy as np

log = logging.getLogger("blip2_triton.bench")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results"
DEFAULT_WORKDIR = ROOT / "artifacts" / "bench"
SYSTEMS = ("server", "in_process", "transformers")
INT8 = "in_process_int8"  # the int8-weight export, in process (compared with fp32 transformers, not token-exact)


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
    # Run time on base-opt, estimated from the run at 1807a3b (248 s with 12 / 6 / 3): ~405 s.
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


# ---- small helpers ------------------------------------------------------------------------------

def summary_ms(seconds: list[float]) -> dict:
    """n, mean and percentiles (linear interpolation) in milliseconds."""
    values = np.asarray([s for s in seconds if s is not None], dtype=np.float64) * 1e3
    if values.size == 0:
        return {"n": 0}
    pct = lambda q: round(float(np.percentile(values, q)), 3)  # noqa: E731
    return {"n": int(values.size), "mean": round(float(values.mean()), 3), "p50": pct(50), "p90": pct(90),
            "p99": pct(99), "min": round(float(values.min()), 3), "max": round(float(values.max()), 3)}


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return round(ours / theirs, 4) if ours and theirs else None


class Progress:
    """Progress on stderr: a tqdm bar per phase on a terminal, plain log lines otherwise."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.perf_counter()

    def phase(self, name: str, total: int):
        if sys.stderr.isatty() and not self.quiet:
            from tqdm import tqdm

            return tqdm(total=total, desc=f"  {name}", unit="req", file=sys.stderr, leave=True, dynamic_ncols=True)
        return _LogPhase(name, total, self.quiet)

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


class _LogPhase:
    """tqdm's update()/close() as log lines: at the start, every quarter and at the end."""

    def __init__(self, name: str, total: int, quiet: bool):
        self.name, self.total, self.quiet, self.done = name, max(total, 1), quiet, 0
        self.start = time.perf_counter()
        self._say(f"  {name}: {total} to do")

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        before = self.done * 4 // self.total
        self.done += n
        if self.done * 4 // self.total > before and self.done < self.total:
            self._say(f"  {self.name}: {self.done}/{self.total} ({time.perf_counter() - self.start:.0f}s)")

    def close(self) -> None:
        self._say(f"  {self.name}: done in {time.perf_counter() - self.start:.1f}s")


# ---- one model --------------------------------------------------------------------------------

def baseline_name(threads: int) -> str:
    return f"transformers_{threads}_thread{'s' if threads != 1 else ''}"


def bench_model(spec: str, settings: Settings, args, progress: Progress) -> dict:
    from blip2_triton import repository, specs
    from blip2_triton.server.launcher import TritonServer, model_stub_pids
    from blip2_triton.serving.onnx_graph import THREADS_ENV

    from . import end_to_end, machine, perf_analyzer
    from .worker import Worker
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
    result: dict = {"model": model.as_dict(), "workloads": [asdict(w) for w in loads],
                    "decoder_weights": machine.decoder_weights(repository.graph_path(model.repository, specs.LLM_DECODER))}
    if model.int8_repository:
        result["decoder_weights_int8"] = machine.decoder_weights(
            repository.graph_path(model.int8_repository, specs.LLM_DECODER))
    result["graph_costs"] = graph_costs(model.repository, loads)

    progress.say(f"[{spec}] starting workers (transformers, in-process) and tritonserver")
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # Workers load while tritonserver starts.
        workers = {
            "in_process": Worker("local", model.repository, settings.threads, logs / "in_process.log"),
            **({INT8: Worker("local", model.int8_repository, settings.threads, logs / f"{INT8}.log")}
               if model.int8_repository else {}),
            "transformers": Worker("transformers", model.checkpoint, settings.threads, logs / "transformers.log"),
        }
        for n in settings.extra_baseline_threads:
            workers[baseline_name(n)] = Worker("transformers", model.checkpoint, n, logs / f"{baseline_name(n)}.log")
        for worker in workers.values():
            stack.enter_context(worker)
        # Every served onnxruntime session runs the benchmark's thread count.
        server = stack.enter_context(TritonServer(
            model.repository, grpc_port=None, http_port=None, metrics_port=None,
            log_file=logs / "tritonserver.log", startup_timeout=600, env={THREADS_ENV: str(settings.threads)}))
        sampler = end_to_end.GroupMemorySampler(server.pgid).start()
        try:
            # What the served models' processes really received, read back from /proc.
            result["server_threads_env"] = {
                model: _environment(pid).get(THREADS_ENV) for model, pid in model_stub_pids(server.pgid).items()}
            result["startup_seconds"] = {"tritonserver": server.startup_seconds} | {
                f"{name}_load": w.info["load_seconds"] for name, w in workers.items()}
            result["baseline_info"] = workers["transformers"].info
            progress.say(f"[{spec}] all up in {time.perf_counter() - t_start:.1f}s")
            for worker in workers.values():
                worker.send_images(pictures)
            loop = asyncio.new_event_loop()
            try:
                result |= _measure(loop, server, workers, loads, pictures, settings, progress)
                if args.perf_analyzer:
                    progress.say(f"[{spec}] perf_analyzer cross-check")
                    result["perf_analyzer"] = perf_analyzer.run(server.grpc_url, pictures[0], loads[0], logs,
                                                                args.perf_analyzer_concurrency)
                else:
                    result["perf_analyzer"] = {"skipped": "run with --perf-analyzer"}
            finally:
                loop.close()
            pss = sampler.pss()
        finally:
            sampler.stop()
        progress.say(f"[{spec}] stopping")
        result["memory"] = {
            "server_peak_rss_mib": round(sampler.peak_total / 2**20, 1),
            "server_peak_rss_by_process_mib": {k: round(v / 2**20, 1) for k, v in sorted(sampler.peak_by_process.items())},
            "server_pss_at_end_mib": round(sum(pss.values()) / 2**20, 1) if pss else None,
            "server_pss_by_process_mib": {k: round(v / 2**20, 1) for k, v in sorted(pss.items())},
            "server_samples": sampler.samples,
            **{f"{name}_peak_rss_mib": round(w.call("memory")["peak_rss_mib"], 1) for name, w in workers.items()},
            "note": "server: sum over tritonserver and its stubs, sampled every 0.25 s (shared pages are "
                    "counted once per process; PSS splits them); workers: their own peak (VmHWM)",
        }
    result["seconds"] = round(time.perf_counter() - t_model, 1)
    return result


def _measure(loop, server, workers: dict, loads, pictures, settings: Settings, progress: Progress) -> dict:
    from blip2_triton import interface as api
    from blip2_triton.client import AsyncBlip2Client

    from . import end_to_end, machine, stages
    from .machine import CpuMeter

    run = loop.run_until_complete
    meter = CpuMeter()
    per_workload = stages.PerWorkload(server.grpc_url, server.metrics_url)

    async def connect():  # a grpc.aio channel belongs to the loop it is created on
        client = AsyncBlip2Client(server.grpc_url, timeout=600)
        streamer = end_to_end.stream_client(server.grpc_url)
        await client.is_ready()
        await streamer.is_model_ready(api.PIPELINE)
        return client, streamer

    client, streamer = run(connect())
    systems = ["server", *workers]

    phase_start = time.perf_counter()

    def measured(fn):
        """fn()'s result plus how many cores other users' processes, and ours, kept busy meanwhile."""
        before = meter.snapshot()
        r = fn()
        after = meter.snapshot()
        r["others_cores"] = meter.others_cores(before, after)
        r["our_cores"] = meter.our_cores(before, after)
        return r

    def call(system: str, workload, image: int) -> dict:
        started = time.perf_counter() - phase_start
        if system == "server":
            before = per_workload.snapshot()
            r = measured(lambda: run(end_to_end.request(client, pictures[image], workload)))
            per_workload.add(workload.name, before, per_workload.snapshot())
        else:
            r = measured(lambda: workers[system].call("generate", image=image, prompt=workload.prompt,
                                                      controls=workload.controls))
        r["image"] = image
        r["started"] = started
        return r

    try:
        # Warm-up: first calls pay for lazy initialisation (thread pools, allocator growth).
        bar = progress.phase("warm-up", settings.warmup * len(loads) * len(systems))
        for k in range(settings.warmup):
            for w in loads:
                for system in systems:
                    call(system, w, k % len(pictures))
                    bar.update()
        bar.close()
        per_workload.reset()  # the warm-up does not count

        # Interleaved single requests: the systems take turns (rotating order), so load from other
        # users of the machine falls on all of them alike.
        samples = {w.name: {s: [] for s in systems} for w in loads}
        bar = progress.phase(f"latency ({', '.join(systems)} in turns)", settings.reps * len(loads) * len(systems))
        for rep in range(settings.reps):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            for w in loads:
                for system in order:
                    samples[w.name][system].append(call(system, w, rep % len(pictures)))
                    bar.update()
        bar.close()
        server_stages = per_workload.result()

        streams = {w.name: [] for w in loads}
        bar = progress.phase("streaming through the server (time to first token)", settings.stream_reps * len(loads))
        for rep in range(settings.stream_reps):
            for w in loads:
                r = measured(lambda: run(end_to_end.stream(streamer, pictures[rep % len(pictures)], w)))
                r["image"] = rep % len(pictures)
                streams[w.name].append(r)
                bar.update()
        bar.close()

        past = settings.caption_tokens // 2 + 40
        decode_rows, decode_rounds = {}, {}
        probe = machine.BandwidthProbe(settings.bandwidth_mib)
        for system in ("in_process", INT8):
            if system in workers:
                bar = progress.phase(f"decode step vs rows {list(settings.decode_rows)}, next to a bandwidth probe "
                                     f"({system})", settings.decode_rounds)
                rounds = []
                for _ in range(settings.decode_rounds):
                    gbps = probe.read_gbps()
                    steps = workers[system].call("decode_vs_rows", rows=list(settings.decode_rows), past_length=past)
                    rounds.append({"read_gbps": round(gbps, 2),
                                   "step_ms": {d["rows"]: round(d["step_seconds"] * 1e3, 4) for d in steps}})
                    bar.update()
                bar.close()
                decode_rounds[system] = rounds
                decode_rows[system] = [{"rows": n, "step_seconds": statistics.median(r["step_ms"][n] for r in rounds) / 1e3}
                                       for n in settings.decode_rows]
        del probe

        caption = loads[0]
        throughput = []
        total = sum(c * settings.requests_per_stream for c in settings.concurrency)
        bar = progress.phase(f"throughput vs concurrent streams {list(settings.concurrency)}", total)
        for streams_n in settings.concurrency:
            before = per_workload.snapshot()
            r = measured(lambda: run(end_to_end.closed_loop(server.grpc_url, streams_n, settings.requests_per_stream,
                                                            pictures, caption)))
            after = per_workload.snapshot()
            level = stages.server_stages(before[0], after[0], before[1], after[1])
            r["server"] = _batching(level)
            r["latency_ms"] = summary_ms(r.pop("latencies"))
            throughput.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
            bar.update(streams_n * settings.requests_per_stream)
        bar.close()

        baseline_batches = []
        bar = progress.phase(f"transformers static batches {list(settings.baseline_batches)}", len(settings.baseline_batches))
        for n in settings.baseline_batches:
            r = measured(lambda: workers["transformers"].call("batch", images=[i % len(pictures) for i in range(n)],
                                                              prompt=caption.prompt, controls=caption.controls))
            baseline_batches.append({"batch": n, "seconds": round(r["seconds"], 4), "tokens": r["tokens"],
                                     "requests_per_s": round(n / r["seconds"], 4),
                                     "tokens_per_s": round(r["tokens"] / r["seconds"], 4),
                                     "others_cores": r["others_cores"]})
            bar.update()
        bar.close()
    finally:
        per_workload.close()
        run(client.close())
        run(streamer.close())

    stage_medians = _stage_medians(loads, samples)
    return {
        "systems": systems,
        "throughput_bound": _throughput_bound(stage_medians[caption.name], caption.max_new_tokens,
                                              decode_rows["in_process"], throughput),
        "raw": _raw(loads, samples, streams),
        "end_to_end": _end_to_end(loads, samples, streams, systems, settings.quiet_cores),
        "tokens_identical": _identical(loads, samples, streams, systems),
        **({"int8_agreement": _int8_agreement(loads, samples)} if INT8 in systems else {}),
        "stages": {"in_process": stage_medians, "server": server_stages,
                   **{"decode_step_vs_rows" + ("_int8" if system == INT8 else ""):
                      [{"rows": d["rows"], "step_ms": round(d["step_seconds"] * 1e3, 3),
                        "ms_per_token": round(d["step_seconds"] * 1e3 / d["rows"], 3)} for d in rows]
                      for system, rows in decode_rows.items()},
                   "decode_step_rounds": decode_rounds,
                   "decode_step_past_length": past},
        "throughput": throughput,
        "baseline_batches": baseline_batches,
    }


def _throughput_bound(stages_ms: dict, tokens: int, decode_rows: list[dict], throughput: list[dict], rows: int = 8) -> dict:
    """Requests/s the machine could serve if no core ever idled: 1 / the CPU time one request costs.

    Every in-process stage runs with one thread per core, so its median time is the whole machine's
    time for it: preprocess + vision + Q-Former + prefill once, plus `tokens` decode steps at the
    per-token cost of a `rows`-sequence batch (what continuous batching at that concurrency buys).
    """
    measured = {d["rows"]: d["step_seconds"] / d["rows"] for d in decode_rows}
    at = max((r for r in measured if r <= rows), default=min(measured))
    once = sum(stages_ms[f"{k}_ms"] for k in ("preprocess", "vision_encoder", "qformer", "prefill"))
    cost_ms = once + tokens * measured[at] * 1e3
    bound = 1e3 / cost_ms
    level = next((t for t in throughput if t["streams"] == rows), None)
    return {"rows": at, "once_ms": round(once, 3), "decode_ms_per_token": round(measured[at] * 1e3, 3),
            "request_cost_ms": round(cost_ms, 3), "bound_requests_per_s": round(bound, 4),
            "streams": rows, "measured_requests_per_s": level["requests_per_s"] if level else None,
            "measured_over_bound": round(level["requests_per_s"] / bound, 4) if level else None}


def _environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").partition("=")[::2] for e in entries if b"=" in e)


def graph_costs(repo: Path, loads) -> dict:
    """FLOPs and weight bytes of the vision encoder, the Q-Former and each workload's prefill, at
    the shapes one request of that workload feeds them (batch 1; the prompt tokenized as served)."""
    from blip2_triton import repository, specs
    from blip2_triton.serving.preprocess import Preprocessor

    from . import flops

    from transformers import AutoConfig

    preprocessor = Preprocessor(repository.assets_dir(repo))
    queries = AutoConfig.from_pretrained(repository.assets_dir(repo)).num_query_tokens
    costs = {}
    for graph in (specs.VISION_ENCODER, specs.QFORMER):
        path = repository.graph_path(repo, graph)
        costs[graph] = flops.graph_cost(path, {"batch_size": 1})
    decoder = repository.graph_path(repo, specs.LLM_DECODER)
    for w in loads:
        prompt = len(preprocessor.prompt_ids(w.prompt))
        total = queries + prompt
        dims = {"batch_size": 1, "sequence_length": prompt, "prefix_length": queries,
                "total_sequence_length": total, "max_sequence_length": total}
        costs[f"prefill:{w.name}"] = flops.graph_cost(decoder, dims)
    return costs


STAGE_GRAPHS = {"vision_encoder": "vision_encoder", "qformer": "qformer", "prefill": "prefill:{workload}"}


def stage_floors(result: dict, caps) -> dict:
    """Per workload and stage (vision encoder, Q-Former, prefill): the floor of its graph (FLOPs at
    the measured matmul rate, weight bytes at the measured bandwidth, the larger of the two), and
    measured / floor in process (median) and on the server (Triton's compute time, the engine's
    prefill metric; means over the workload's requests)."""
    from . import flops

    out = {}
    for w, inproc in result["stages"]["in_process"].items():
        server = result["stages"]["server"].get(w, {})
        models, gen = server.get("models", {}), server.get("generator_metrics", {})
        served = {"vision_encoder": models.get("vision_encoder", {}).get("compute_infer_ms"),
                  "qformer": models.get("qformer", {}).get("compute_infer_ms"),
                  "prefill": gen.get("prefill_ms")}
        out[w] = {}
        for stage, graph in STAGE_GRAPHS.items():
            f = flops.floor(result["graph_costs"][graph.format(workload=w)], caps.read_gbps, caps.matmul_gflops)
            ours = inproc.get(f"{stage}_ms")
            out[w][stage] = f | {"in_process_ms": ours, "server_ms": served[stage] and round(served[stage], 3),
                                 "in_process_over_floor": _ratio(ours, f["floor_ms"]),
                                 "server_over_floor": _ratio(served[stage], f["floor_ms"])}
    return out


def _batching(level: dict) -> dict:
    """How the server batched at one concurrency level: each model's mean batch, queue and compute
    per request, and the continuous batcher's mean rows per decode step."""
    g = level["generator_metrics"]
    rows = ((g["generated_tokens"] - g["prefills"]) / g["decode_steps"]) if g.get("decode_steps") else None
    return {
        "decode_rows_per_step": round(rows, 2) if rows else None,
        "models": {k: {"mean_batch": v["mean_batch"], "queue_ms": round(v["queue_ms"], 2),
                       "compute_infer_ms": round(v["compute_infer_ms"], 2)}
                   for k, v in level["models"].items() if k in ("preprocess", "vision_encoder", "qformer")},
    }


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


def _mean_step(r: dict) -> float | None:
    """Seconds per decode step of one request: first token to last over the steps between.

    Mean, not median, of the gaps: streamed responses can arrive in bursts (several tokens in one
    read), which makes single gaps meaningless but leaves first-to-last intact.
    """
    if "stages" in r:
        return r["stages"]["decode"] / r["decode_steps"] if r["decode_steps"] else None
    gaps = r.get("inter_token")
    return statistics.mean(gaps) if gaps else None


def _end_to_end(loads, samples, streams, systems, quiet_cores: float) -> dict:
    out = {}
    for w in loads:
        per = samples[w.name]
        entry = {}
        for system in systems:
            runs = per[system]
            entry[system] = {
                "latency_ms": summary_ms([r["seconds"] for r in runs]),
                # Only the requests during which other users' processes kept < quiet_cores busy.
                "latency_ms_quiet": summary_ms([r["seconds"] for r in runs if r["others_cores"] < quiet_cores]),
                "others_cores_mean": round(statistics.mean(r["others_cores"] for r in runs), 3),
                "ttft_ms": summary_ms([r.get("ttft") for r in runs]) if system != "server" else None,
                "tokens_per_request": statistics.mean(len(r["tokens"]) for r in runs),
            }
            entry[system]["tokens_per_s"] = round(
                entry[system]["tokens_per_request"] / (entry[system]["latency_ms"]["p50"] / 1e3), 3)
            gaps = [g for r in runs for g in r.get("inter_token", [])]
            if gaps:
                entry[system]["inter_token_ms"] = summary_ms(gaps)
            entry[system]["decode_step_ms"] = summary_ms([_mean_step(r) for r in runs])
        st = streams[w.name]
        entry["server_stream"] = {
            "others_cores_mean": round(statistics.mean(r["others_cores"] for r in st), 3) if st else None,
            "latency_ms": summary_ms([r["seconds"] for r in st]),
            "ttft_ms": summary_ms([r["ttft"] for r in st]),
            "inter_token_ms": summary_ms([g for r in st for g in r["inter_token"]]),
            "decode_step_ms": summary_ms([_mean_step(r) for r in st]),
            "responses_per_request": statistics.mean(r["responses"] for r in st) if st else None,
        }
        p50 = {s: entry[s]["latency_ms"]["p50"] for s in systems}
        best = {s: entry[s]["latency_ms"]["min"] for s in systems}
        quiet = {s: entry[s]["latency_ms_quiet"].get("p50") if entry[s]["latency_ms_quiet"]["n"] >= 3 else None
                 for s in systems}
        ttft = {s: entry[s]["ttft_ms"]["p50"] for s in systems if s != "server"}
        ttft["server"] = entry["server_stream"]["ttft_ms"].get("p50")
        ratios = {}
        for baseline in (s for s in systems if s.startswith("transformers")):
            suffix = "" if baseline == "transformers" else f"_vs_{baseline}"
            if INT8 in systems:
                ratios[f"{INT8}_latency_p50{suffix}"] = _ratio(p50[INT8], p50[baseline])
                ratios[f"{INT8}_latency_p50_quiet{suffix}"] = _ratio(quiet[INT8], quiet[baseline])
            ratios[f"server_latency_p50{suffix}"] = _ratio(p50["server"], p50[baseline])
            ratios[f"in_process_latency_p50{suffix}"] = _ratio(p50["in_process"], p50[baseline])
            ratios[f"server_latency_p50_quiet{suffix}"] = _ratio(quiet["server"], quiet[baseline])
            ratios[f"in_process_latency_p50_quiet{suffix}"] = _ratio(quiet["in_process"], quiet[baseline])
            # The fastest of each: the request least disturbed by other users of the machine.
            ratios[f"server_latency_min{suffix}"] = _ratio(best["server"], best[baseline])
            ratios[f"in_process_latency_min{suffix}"] = _ratio(best["in_process"], best[baseline])
            ratios[f"server_stream_ttft_p50{suffix}"] = _ratio(ttft["server"], ttft[baseline])
            ratios[f"in_process_ttft_p50{suffix}"] = _ratio(ttft["in_process"], ttft[baseline])
        ratios["server_tokens_per_s"] = _ratio(entry["server"]["tokens_per_s"], entry["transformers"]["tokens_per_s"])
        entry["ratios_ours_over_transformers"] = ratios
        paired = [(a["seconds"] - b["seconds"]) for a, b in zip(per["server"], per["in_process"])]
        entry["server_overhead_ms"] = {
            "p50_difference": round(p50["server"] - p50["in_process"], 3),
            "p50_quiet_difference": round(quiet["server"] - quiet["in_process"], 3)
            if quiet["server"] and quiet["in_process"] else None,
            "paired_median": round(statistics.median(paired) * 1e3, 3) if paired else None,
            "relative_to_in_process": _ratio(p50["server"] - p50["in_process"], p50["in_process"]),
        }
        out[w.name] = entry
    return out


def _identical(loads, samples, streams, systems) -> dict:
    """Do the server (one-shot and streamed), the in-process pipeline (and transformers at other
    thread counts) produce exactly the token ids transformers generates for the same request?"""
    out = {"all": True, "compared": 0, "mismatches": []}
    for w in loads:
        reference = {r["image"]: r["tokens"] for r in samples[w.name]["transformers"]}
        candidates = [(s, r["image"], r["tokens"]) for s in systems if s not in ("transformers", INT8)
                      for r in samples[w.name][s]]
        candidates += [("server_stream", r["image"], r["tokens"]) for r in streams[w.name]]
        for system, image, tokens in candidates:
            if image not in reference:
                continue
            out["compared"] += 1
            if tokens != reference[image]:
                out["all"] = False
                out["mismatches"].append({"workload": w.name, "system": system, "image": image,
                                          "ours": tokens, "transformers": reference[image]})
    out["distinct_tokens_in_reference"] = len({t for w in loads for r in samples[w.name]["transformers"] for t in r["tokens"]})
    return out


def _int8_agreement(loads, samples) -> dict:
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
    return {"compared": compared, "identical": same,
            "mean_agreeing_prefix": round(statistics.mean(prefix), 4) if prefix else None}


def _stage_medians(loads, samples) -> dict:
    """Median per stage (ms) over the interleaved in-process requests."""
    out = {}
    for w in loads:
        runs = samples[w.name]["in_process"]
        keys = [k for k, v in runs[0]["stages"].items() if v is not None]
        out[w.name] = {f"{k}_ms": round(statistics.median(r["stages"][k] for r in runs) * 1e3, 3) for k in keys}
        out[w.name]["tokens"] = len(runs[0]["tokens"])
        out[w.name]["decode_steps"] = runs[0]["decode_steps"]
    return out


# ---- the command --------------------------------------------------------------------------------

def default_models() -> list[str]:
    from blip2_triton.embedded import TRAINED_MODEL

    models = ["base-opt"]
    if (TRAINED_MODEL / "model.safetensors").exists():
        models.append(str(TRAINED_MODEL))
    return models


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", dest="models", metavar="PRESET_OR_DIR",
                   help="a preset (base-opt, tiny-opt, ...) or a checkpoint directory; repeatable "
                        "(default: base-opt, and the trained tiny model when present)")
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
                   help="also run perf_analyzer (from .venv-perf, created on first use) against the server")
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
    progress = Progress(args.quiet)
    start = time.perf_counter()
    models = args.models or default_models()
    progress.say(f"blip2-triton bench: models {models}, {settings.threads} threads, output {args.output}")
    facts = machine.facts(settings.threads, ROOT)
    progress.say("measuring memory bandwidth and matmul rate")
    first = machine.measure(settings.threads, array_mib=settings.bandwidth_mib, matmul_n=settings.matmul_n)
    results = {
        "about": "blip2-triton bench: one run, all systems side by side; times in ms unless named otherwise",
        "command": getattr(args, "command_line", None) or " ".join(["blip2-triton", *sys.argv[1:]]),
        "facts": facts,
        "settings": asdict(settings),
        "models": {},
    }
    for spec in models:
        result = bench_model(spec, settings, args, progress)
        results["models"][result["model"]["name"]] = result
    # Measured again at the end: the best of both is the least disturbed by other load, and the
    # floor must be a lower bound.
    progress.say("measuring memory bandwidth and matmul rate again")
    last = machine.measure(settings.threads, array_mib=settings.bandwidth_mib, matmul_n=settings.matmul_n)
    caps = first.best(last)
    results["capabilities"] = caps.as_dict() | {"at_start": first.as_dict(), "at_end": last.as_dict()}
    for result in results["models"].values():
        result["floor"] = machine.decode_floor(result["decoder_weights"], caps)
        if "decoder_weights_int8" in result:
            result["floor_int8"] = machine.decode_floor(result["decoder_weights_int8"], caps)
        result["stage_floors"] = stage_floors(result, caps)
        rounds = result["stages"]["decode_step_rounds"]
        result["floor_side_by_side"] = {
            system: machine.side_by_side(result["decoder_weights_int8" if system == INT8 else "decoder_weights"], r)
            for system, r in rounds.items()}
    results["facts"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["run_seconds"] = round(time.perf_counter() - start, 1)
    progress.say("writing results")
    paths = report.write(results, Path(args.output))
    if not args.quiet:
        print(report.markdown(results), file=sys.stderr)
    progress.say("wrote " + ", ".join(str(p) for p in paths) + f" in {results['run_seconds']:.0f}s")
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
