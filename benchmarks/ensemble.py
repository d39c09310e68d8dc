"""`blip2_ensemble` next to `blip2` on one server: per-request latency and throughput at 1/8/16 streams.

Both entry points share `blip2`'s process, decoder and engine, so the difference is what the
ensemble adds: Triton scheduling its four steps (and passing tensors between them) instead of
`blip2`'s BLS calls, and each streamed token passing through the ensemble. `blip2`'s image cache
is off, so both run every stage; the two models take turns, so load from outside falls on both
alike. With --perf-analyzer, Triton's own load generator then drives each model too (the same
request, one response each: its latency is the whole request's). Run:

    python -m blip2_triton.benchmarks.ensemble [--model base-opt] [--workdir artifacts/bench] [--perf-analyzer]

Writes benchmarks/results/ensemble.json (every request's seconds and tokens) and prints tables.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from blip2_triton import api
from blip2_triton.repository import DEFAULT_IMAGE_CACHE_BYTES

from . import machine
from .run import DEFAULT_WORKDIR
from .tables import table
from .workloads import configure_image_cache, images, prepare_model, workloads

RESULTS = Path(__file__).parent / "results" / "ensemble.json"
MODELS = (api.PIPELINE, api.ENSEMBLE)


async def _one(client, image: bytes, workload) -> dict:
    start = time.perf_counter()
    result = await client.generate(image, workload.prompt, **workload.controls)
    return {"seconds": time.perf_counter() - start, "tokens": result.token_ids}


async def measure(url: str, pictures: list[bytes], workload, singles: int, levels: list[int], per_stream: int) -> dict:
    from blip2_triton.client import AsyncBlip2Client

    clients = {m: AsyncBlip2Client(url, model=m, timeout=600) for m in MODELS}
    try:
        for client in clients.values():
            await _one(client, pictures[0], workload)  # warm-up
        single = {m: [] for m in MODELS}
        for i in range(singles):
            for m, client in clients.items():
                single[m].append(await _one(client, pictures[i % len(pictures)], workload))
        throughput = {m: [] for m in MODELS}
        for level in levels:
            for m, client in clients.items():
                async def stream(s: int) -> list[dict]:
                    return [await _one(client, pictures[(s + k) % len(pictures)], workload) for k in range(per_stream)]

                start = time.perf_counter()
                done = await asyncio.gather(*(stream(s) for s in range(level)))
                seconds = time.perf_counter() - start
                throughput[m].append({"streams": level, "requests": level * per_stream, "seconds": seconds,
                                      "requests_per_s": level * per_stream / seconds,
                                      "latencies_s": [r["seconds"] for rs in done for r in rs]})
        return {"single": single, "throughput": throughput}
    finally:
        for client in clients.values():
            await client.close()


def summarize(runs: dict) -> dict:
    p50 = {m: statistics.median(r["seconds"] for r in runs["single"][m]) for m in MODELS}
    same = [a["tokens"] == b["tokens"] for a, b in zip(runs["single"][MODELS[0]], runs["single"][MODELS[1]])]
    return {
        "single_p50_s": p50,
        "ensemble_overhead_ms": (p50[api.ENSEMBLE] - p50[api.PIPELINE]) * 1e3,
        "tokens_identical": all(same),
        "requests_per_s": {m: {t["streams"]: t["requests_per_s"] for t in runs["throughput"][m]} for m in MODELS},
    }


def perf_analyzer_table(runs: dict) -> str:
    """perf_analyzer's rows of each model side by side (or why a model has none)."""
    rows, notes = [], []
    for m, run in runs.items():
        if not run.get("ok"):
            notes.append(f"perf_analyzer on {m}: {run.get('error')}")
            continue
        rows += [[m, r["concurrency"], round(r["requests_per_s"], 3), round(r["p50_ms"]), round(r["p90_ms"]),
                  round(r["server_queue_ms"]), round(r["server_compute_infer_ms"])] for r in run["rows"]]
    head = ["perf_analyzer: model", "concurrency", "requests/s", "p50 (ms)", "p90 (ms)", "server queue (ms)",
            "server compute (ms)"]
    return "\n".join([table(head, rows) if rows else "", *notes])


def render(summary: dict) -> str:
    p50 = summary["single_p50_s"]
    lines = [table(["one request at a time", "p50 (ms)"],
                   [[m, round(p50[m] * 1e3, 1)] for m in MODELS]),
             f"ensemble - blip2: {summary['ensemble_overhead_ms']:.1f} ms per request; "
             f"tokens identical: {summary['tokens_identical']}", ""]
    rps = summary["requests_per_s"]
    levels = sorted(rps[MODELS[0]])
    lines.append(table(["streams", *[f"{m} (requests/s)" for m in MODELS], "ensemble / blip2"],
                       [[n, round(rps[MODELS[0]][n], 2), round(rps[MODELS[1]][n], 2),
                         round(rps[MODELS[1]][n] / rps[MODELS[0]][n], 3)] for n in levels]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from blip2_triton.server.launcher import TritonServer
    from blip2_triton.serving.onnx_graph import THREADS_ENV

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base-opt", help="preset or checkpoint directory (as `blip2-triton bench`)")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workload", default="vqa", choices=[w.name for w in workloads()])
    p.add_argument("--singles", type=int, default=10, help="requests per model, one at a time")
    p.add_argument("--levels", default="1,8,16", help="concurrent streams")
    p.add_argument("--per-stream", type=int, default=2, help="requests each stream sends, one after the other")
    p.add_argument("--perf-analyzer", action="store_true",
                   help="also drive each model with perf_analyzer (from .venv-perf, created on first use)")
    p.add_argument("--perf-analyzer-concurrency", default="1:8:7", help="perf_analyzer --concurrency-range")
    p.add_argument("--perf-analyzer-requests", type=int, default=6, help="requests per measurement window")
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)

    model = prepare_model(args.model, Path(args.workdir))
    workload = next(w for w in workloads() if w.name == args.workload)
    pictures = images(8)
    logs = Path(args.workdir) / model.name / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    configure_image_cache(model, None)
    try:
        with TritonServer(model.repository, grpc_port=None, http_port=None, metrics_port=None,
                          log_file=logs / "ensemble.log", startup_timeout=600,
                          env={THREADS_ENV: str(args.threads)}) as server:
            print("measuring", file=sys.stderr)
            runs = asyncio.run(measure(server.grpc_url, pictures, workload, args.singles,
                                       [int(n) for n in args.levels.split(",")], args.per_stream))
            perf = {}
            if args.perf_analyzer:
                from . import perf_analyzer

                for m in MODELS:
                    print(f"perf_analyzer on {m}", file=sys.stderr)
                    work = logs / "perf_analyzer" / m
                    perf[m] = perf_analyzer.run(server.grpc_url, pictures[0], workload, work,
                                                args.perf_analyzer_concurrency, args.perf_analyzer_requests, model=m)
                    # its own CSV and full output next to the JSON
                    raw = Path(args.output).parent / "ensemble_perf_analyzer"
                    raw.mkdir(parents=True, exist_ok=True)
                    for name in ("perf_analyzer.csv", "perf_analyzer.out"):
                        if (work / name).exists():
                            shutil.copyfile(work / name, raw / f"{m}_{name}")
    finally:
        configure_image_cache(model, DEFAULT_IMAGE_CACHE_BYTES)  # as exported
    summary = summarize(runs)
    out = {"facts": machine.facts(args.threads, Path(__file__).resolve().parents[1]), "model": model.as_dict(),
           "settings": vars(args), "summary": summary, "runs": runs, "perf_analyzer": perf}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(render(summary))
    if perf:
        print("\n" + perf_analyzer_table(perf))
    print(f"raw results: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
