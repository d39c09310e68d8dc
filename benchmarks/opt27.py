"""The guide's own model size on this machine: Salesforce/blip2-opt-2.7b's architecture with random
weights (`make-tiny --preset opt-2.7b-size`), exported with --low-memory in int8 and int4.

    python -m blip2_triton.benchmarks.opt27 --preset opt-2.7b-size [--workdir artifacts/opt27] \
        [--stages build,export-int8,export-int4,...]

Stages, each skipped when its result exists (delete the JSON to run it again), one at a time:
- build: the checkpoint, shard by shard, weights stored as bfloat16 (7 GB on disk instead of 15;
  the export reads them into fp32 exactly, and transformers in bf16 then runs the same weights);
- export-int8 / export-int4: `blip2-triton export --low-memory --quantize ...` in a child process
  whose RSS (the process tree's) a sampler reads every 0.2 s; wall time, peak RSS and the bound
  the issue sets (1.15x the largest graph's fp32 weight bytes + 1 GiB).
- stages-int8 / stages-int4 (in a child process, 2 onnxruntime threads): the batch-1 decode step
  against its bandwidth floor (the bytes of weights a step reads over the read bandwidth probed
  right before each round of steps), and the vision encoder (batch 1) against its compute floor
  (its FLOPs, counted from the architecture, at the measured fp32 matmul rate);
- server-int8 / server-int4: tritonserver on the repository: RSS / PSS of every process idle and
  after the captions, end-to-end caption latency (30 tokens, one at a time) and tokens/s (also with
  4 in flight) through gRPC;
- transformers: the same captions through transformers' generate() in bfloat16 on the same
  weights, 2 threads, in a child process run after the server has stopped (the two are measured
  in alternating phases, never both alive: the server's int8 weights and transformers' bf16 copy
  would leave little of the machine's 24 GiB to the other users).
Raw numbers: benchmarks/results/opt27_<stage>.json; a table is printed after each stage.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
SAMPLE_SECONDS = 0.2


class RssSampler:
    """Peak and trace of the summed RSS of a process and its children, sampled in a thread."""

    def __init__(self, pid: int, period: float = SAMPLE_SECONDS):
        import psutil

        self.root = psutil.Process(pid)
        self.period, self.peak, self.trace = period, 0, []
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs)
            except psutil.Error:
                rss = 0
            self.peak = max(self.peak, rss)
            self.trace.append((round(time.perf_counter() - self.start, 2), rss))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def largest_graph_fp32_bytes(checkpoint: Path) -> int:
    """fp32 bytes of the largest graph's weights: the language model's (its tied head counted once)."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(checkpoint / shard), "pt") as f:
            for name in f.keys():
                part = name.split(".")[0]
                shape = f.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                sizes[part] = sizes.get(part, 0) + 4 * n
    groups = {"vision_encoder": sizes.get("vision_model", 0),
              "qformer": sizes.get("qformer", 0) + sizes.get("query_tokens", 0) + sizes.get("language_projection", 0),
              "llm_decoder": sizes.get("language_model", 0)}
    return max(groups.values())


def run_export(checkpoint: Path, repository: Path, quantize: str, log: Path) -> dict:
    cmd = ["nice", "-n", "10", sys.executable, "-m", "blip2_triton.cli", "export", "--model", str(checkpoint),
           "--output", str(repository), "--low-memory", "--quantize", quantize]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = RssSampler(proc.pid)
        for line in proc.stdout:  # progress, as it comes
            print("  " + line.rstrip(), flush=True)
            out.write(line)
        code = proc.wait()
        sampler.stop()
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"export failed ({code}); log: {log}")
    largest = largest_graph_fp32_bytes(checkpoint)
    bound = 1.15 * largest + GIB
    report_path = next(repository.glob("blip2/1/checkpoint/export_report.json"))
    report = json.loads(report_path.read_text())
    return {"quantize": quantize, "seconds": round(seconds, 1), "peak_rss_bytes": sampler.peak,
            "largest_graph_fp32_bytes": largest, "bound_bytes": int(bound), "within_bound": sampler.peak <= bound,
            "graphs": report["graphs"], "max_abs_diff": report["max_abs_diff"],
            "exporter_peak_rss_mib": report["peak_rss_mib"],
            "rss_trace": sampler.trace[:: max(1, len(sampler.trace) // 2000)]}


CAPTION_TOKENS = 30
CAPTIONS = 4
THREADS = 2


def vision_flops(config) -> int:
    """FLOPs of one image through the ViT: patch embedding, and per layer the qkv, output and MLP
    products plus attention (QK^T and the weighted sum); norms and activations left out."""
    v = config.vision_config
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    d, mlp = v.hidden_size, v.intermediate_size
    patch = 2 * (tokens - 1) * d * 3 * v.patch_size**2
    layer = 2 * tokens * (4 * d * d + 2 * d * mlp) + 4 * tokens * tokens * d
    return patch + v.num_hidden_layers * layer


def int8_matmul_gops(m: int, k: int, n: int, threads: int = THREADS, repeats: int = 5) -> float:
    """Best GOP/s of onnxruntime's DynamicQuantizeMatMul (int8 weights, per column; the op the int8
    graphs run) on [m, k] x [k, n]: the int8 vision encoder's rate, which the fp32 matmul rate
    does not bound (VNNI multiplies int8 several times faster than fp32)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from .machine import _best_seconds

    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (k, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeMatMul", ["a", "b", "s", "z"], ["c"], domain="com.microsoft")], "dqmm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(weight, "b"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "s"),
         numpy_helper.from_array(np.zeros(n, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": rng.standard_normal((m, k), dtype=np.float32)}
    return 2 * m * k * n / _best_seconds(lambda: session.run(None, feed), repeats) / 1e9


def measure_stages(repository: Path, rounds: int = 5, steps: int = 8) -> dict:
    """In process: the decode step (batch 1) against its bandwidth floor, round by round, and the
    vision encoder (batch 1) against its compute floor."""
    import statistics

    import numpy as np
    from transformers import Blip2Config

    from blip2_triton import repository as repo_layout
    from blip2_triton import specs
    from blip2_triton.serving.decoder import DecoderGraph
    from blip2_triton.serving.onnx_graph import OnnxGraph

    from .machine import BandwidthProbe, decoder_weights, measure

    config = Blip2Config.from_pretrained(next(repository.glob("blip2/1/checkpoint")))
    caps = measure(THREADS, repeats=4)
    print(f"  machine: read {caps.read_gbps:.1f} GB/s, fp32 matmul {caps.matmul_gflops:.0f} GFLOP/s", flush=True)
    decoder_path = repo_layout.graph_path(repository, specs.LLM_DECODER)
    weights = decoder_weights(decoder_path)
    decoder = DecoderGraph(decoder_path, threads=THREADS)
    rng = np.random.default_rng(0)
    width = config.text_config.word_embed_proj_dim
    queries, prompt = config.num_query_tokens, 5
    cache = decoder.new_cache(slots=1, capacity=queries + prompt + rounds * steps + 8)
    length = queries + prompt
    start = time.perf_counter()
    logits = decoder({specs.INPUT_IDS: rng.integers(3, 1000, (1, prompt)),
                      specs.PREFIX_EMBEDS: rng.standard_normal((1, queries, width)).astype(np.float32),
                      specs.ATTENTION_MASK: np.ones((1, length), np.int64)}, cache.rows(0, 1))
    prefill_ms = (time.perf_counter() - start) * 1e3
    probe = BandwidthProbe(512)
    per_round = []
    for r in range(rounds):
        gbps = probe.read_gbps()
        times = []
        for _ in range(steps):
            length += 1
            start = time.perf_counter()
            logits = decoder({specs.INPUT_IDS: logits.argmax(-1).reshape(1, 1),
                              specs.PREFIX_EMBEDS: np.zeros((1, 0, width), np.float32),
                              specs.ATTENTION_MASK: np.ones((1, length), np.int64)}, cache.rows(0, 1))
            times.append((time.perf_counter() - start) * 1e3)
        step = statistics.median(times)
        floor = weights.bytes_read_per_step / (gbps * 1e9) * 1e3
        per_round.append({"read_gbps": round(gbps, 2), "step_ms": round(step, 2), "floor_ms": round(floor, 2),
                          "ratio": round(step / floor, 3), "steps_ms": [round(t, 2) for t in times]})
        print(f"  decode round {r + 1}/{rounds}: step {step:.1f} ms, floor {floor:.1f} ms ({step / floor:.2f}x)", flush=True)
    del decoder, cache
    vision = OnnxGraph(repo_layout.graph_path(repository, specs.VISION_ENCODER), threads=THREADS)
    pixels = rng.standard_normal((1, 3, config.vision_config.image_size, config.vision_config.image_size)).astype(np.float32)
    vision(pixel_values=pixels)  # warm-up
    vision_ms = []
    for _ in range(3):
        start = time.perf_counter()
        vision(pixel_values=pixels)
        vision_ms.append((time.perf_counter() - start) * 1e3)
    flops = vision_flops(config)
    compute_floor = flops / (caps.matmul_gflops * 1e9) * 1e3
    v = config.vision_config
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    int8_gops = int8_matmul_gops(tokens, v.hidden_size, v.intermediate_size)
    int8_floor = flops / (int8_gops * 1e9) * 1e3
    vision_best = min(vision_ms)
    print(f"  vision encoder (int8 weights): {vision_best:.0f} ms; fp32 compute floor {compute_floor:.0f} ms "
          f"({vision_best / compute_floor:.2f}x), int8 floor at {int8_gops:.0f} GOP/s {int8_floor:.0f} ms "
          f"({vision_best / int8_floor:.2f}x)", flush=True)
    return {"machine": caps.as_dict(), "decoder_weights": weights.__dict__, "prefill_ms": round(prefill_ms, 1),
            "decode_rounds": per_round,
            "decode_ratio_median": statistics.median(r["ratio"] for r in per_round),
            "decode_step_ms_median": statistics.median(r["step_ms"] for r in per_round),
            "vision_ms": [round(t, 1) for t in vision_ms], "vision_gflops": round(flops / 1e9, 1),
            "vision_compute_floor_ms": round(compute_floor, 1), "vision_ratio": round(vision_best / compute_floor, 3),
            "int8_matmul_gops": round(int8_gops, 1), "vision_int8_floor_ms": round(int8_floor, 1),
            "vision_int8_ratio": round(vision_best / int8_floor, 3)}


def measure_server(repository: Path, log: Path) -> dict:
    """tritonserver on `repository`: memory idle and after the captions; caption latency and tokens/s."""
    import asyncio
    import statistics

    from blip2_triton.client import AsyncBlip2Client
    from blip2_triton.server.launcher import TritonServer
    from blip2_triton.serving.onnx_graph import THREADS_ENV

    from .server_memory import snapshot, weight_bytes
    from .workloads import images

    pictures = images(CAPTIONS)
    started = time.perf_counter()
    with TritonServer(repository, grpc_port=None, http_port=None, metrics_port=None, log_file=log,
                      startup_timeout=1800, env={THREADS_ENV: str(THREADS)}) as server:
        load_seconds = time.perf_counter() - started
        print(f"  server ready in {load_seconds:.0f} s", flush=True)
        time.sleep(2)
        idle = snapshot(server.pgid)

        async def run():
            async with AsyncBlip2Client(server.grpc_url, timeout=1800) as client:
                await client.caption(pictures[0], max_new_tokens=2)  # warm-up
                single = []
                for i, picture in enumerate(pictures):
                    start = time.perf_counter()
                    result = await client.caption(picture, max_new_tokens=CAPTION_TOKENS, min_new_tokens=CAPTION_TOKENS)
                    seconds = time.perf_counter() - start
                    single.append({"seconds": round(seconds, 3), "tokens": len(result.token_ids), "text": result.text})
                    print(f"  caption {i + 1}/{len(pictures)}: {seconds:.1f} s, {len(result.token_ids)} tokens", flush=True)
                start = time.perf_counter()
                results = await asyncio.gather(*(client.caption(p, max_new_tokens=CAPTION_TOKENS,
                                                                min_new_tokens=CAPTION_TOKENS) for p in pictures))
                together = time.perf_counter() - start
                tokens = sum(len(r.token_ids) for r in results)
                print(f"  {len(pictures)} captions at once: {together:.1f} s, {tokens / together:.2f} tokens/s", flush=True)
                return single, {"seconds": round(together, 3), "tokens": tokens, "in_flight": len(pictures)}

        single, together = asyncio.run(run())
        time.sleep(2)
        after = snapshot(server.pgid)
    p50 = statistics.median(r["seconds"] for r in single)
    weights = weight_bytes(repository)

    def total(snap, key):
        return sum(getattr(m, key) for m in snap.values())

    return {"load_seconds": round(load_seconds, 1), "weights_bytes": weights,
            "idle": {k: v.__dict__ for k, v in idle.items()}, "after": {k: v.__dict__ for k, v in after.items()},
            "captions": single, "caption_p50_s": p50,
            "tokens_per_s_single": round(sum(r["tokens"] for r in single) / sum(r["seconds"] for r in single), 3),
            "concurrent": together | {"tokens_per_s": round(together["tokens"] / together["seconds"], 3)},
            "memory_target_mib": round(1.15 * weights / 2**20 + 0.6 * 1024, 1)}


def measure_transformers(checkpoint: Path) -> dict:
    """The same captions through transformers' generate(), bfloat16, on the same weights."""
    import statistics

    import torch
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from .baseline import TokenClock
    from .workloads import images

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    load = time.perf_counter() - start
    print(f"  transformers bf16 loaded in {load:.0f} s", flush=True)
    import io

    from PIL import Image

    runs = []
    for i, picture in enumerate(images(CAPTIONS)):
        clock = TokenClock()
        start = time.perf_counter()
        inputs = processor(images=[Image.open(io.BytesIO(picture)).convert("RGB")], text=[""], return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=CAPTION_TOKENS,
                                 min_new_tokens=CAPTION_TOKENS, streamer=clock)
        seconds = time.perf_counter() - start
        tokens = out.shape[1] - inputs["input_ids"].shape[1]
        steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
        runs.append({"seconds": round(seconds, 3), "tokens": int(tokens),
                     "ttft_s": round(clock.times[0] - start, 3) if clock.times else None,
                     "step_ms_median": round(statistics.median(steps) * 1e3, 1) if steps else None})
        print(f"  transformers caption {i + 1}/{CAPTIONS}: {seconds:.1f} s, {tokens} tokens", flush=True)
    import resource

    return {"dtype": "bfloat16", "threads": THREADS, "load_seconds": round(load, 1), "captions": runs,
            "caption_p50_s": statistics.median(r["seconds"] for r in runs),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _machine() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
            "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "loadavg": os.getloadavg()}


def _export_table(results: dict) -> str:
    rows = ["| export | time | peak RSS | bound (1.15x largest graph + 1 GiB) | graphs on disk |",
            "|---|---|---|---|---|"]
    for r in results.values():
        disk = sum(g["bytes"] for g in r["graphs"].values())
        rows.append(f"| --low-memory --quantize {r['quantize']} | {r['seconds']:.0f} s | {r['peak_rss_bytes'] / GIB:.2f} GiB"
                    f" | {r['bound_bytes'] / GIB:.2f} GiB ({'met' if r['within_bound'] else 'MISSED'}) | {disk / GIB:.2f} GiB |")
    return "\n".join(rows)


def summary_table() -> str:
    """The headline table from whatever stage results exist."""
    def load(name):
        path = RESULTS / f"opt27_{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    rows = ["| opt-2.7b-size | int8 | int4 |", "|---|---|---|"]

    def row(label, fn):
        cells = []
        for q in ("int8", "int4"):
            try:
                cells.append(fn(q))
            except (TypeError, KeyError):
                cells.append("-")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    row("export time, peak RSS (bound)", lambda q: f"{load('export_' + q)['seconds']:.0f} s, "
        f"{load('export_' + q)['peak_rss_bytes'] / GIB:.2f} GiB ({load('export_' + q)['bound_bytes'] / GIB:.2f})")
    row("decode step / bandwidth floor", lambda q: f"{load('stages_' + q)['decode_step_ms_median']:.0f} ms, "
        f"{load('stages_' + q)['decode_ratio_median']:.2f}x")
    row("vision encoder (int8) / fp32 compute floor", lambda q: f"{min(load('stages_' + q)['vision_ms']):.0f} ms, "
        f"{load('stages_' + q)['vision_ratio']:.2f}x")
    row("vision encoder / int8 MatMul floor", lambda q: f"{load('stages_' + q)['vision_int8_ratio']:.2f}x")
    row("server PSS after captions (target)", lambda q: f"{sum(m['pss_mib'] for m in load('server_' + q)['after'].values()) / 1024:.2f} GiB"
        f" ({load('server_' + q)['memory_target_mib'] / 1024:.2f})")
    row("caption p50, 30 tokens (server)", lambda q: f"{load('server_' + q)['caption_p50_s']:.1f} s")
    row("tokens/s: 1 / 4 in flight", lambda q: f"{load('server_' + q)['tokens_per_s_single']:.2f} / "
        f"{load('server_' + q)['concurrent']['tokens_per_s']:.2f}")
    t = load("transformers")
    if t:
        rows.append(f"| transformers bf16, caption p50 | {t['caption_p50_s']:.1f} s | (same) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="opt-2.7b-size")
    parser.add_argument("--workdir", default="artifacts/opt27")
    parser.add_argument("--stages", default="build,export-int8,stages-int8,server-int8,export-int4,stages-int4,"
                                              "server-int4,transformers")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one measurement in its own process, its result as JSON on the last line
        kind, _, quantize = args.child.partition("-")
        workdir = Path(args.workdir)
        result = (measure_stages(workdir / f"repository-{quantize}") if kind == "stages"
                  else measure_transformers(workdir / "checkpoint"))
        print(json.dumps(result))
        return 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "checkpoint"
    RESULTS.mkdir(parents=True, exist_ok=True)
    exports = {}
    for stage in args.stages.split(","):
        if stage == "build":
            if not (checkpoint / "model.safetensors.index.json").exists():
                subprocess.run(["nice", "-n", "10", sys.executable, "-m", "blip2_triton.cli", "make-tiny", "--preset",
                                args.preset, "--weights-dtype", "bfloat16", "--output", str(checkpoint)], check=True)
            continue
        if stage.startswith("export-"):
            quantize = stage.split("-", 1)[1]
            out = RESULTS / f"opt27_export_{quantize}.json"
            if not out.exists():
                result = run_export(checkpoint, workdir / f"repository-{quantize}", quantize, workdir / f"{stage}.log")
                out.write_text(json.dumps(result | {"preset": args.preset, "machine": _machine()}, indent=2))
            exports[quantize] = json.loads(out.read_text())
            print(_export_table(exports), flush=True)
            continue
        out = RESULTS / f"opt27_{stage.replace('-', '_')}.json"
        if stage.startswith("server-"):
            if not out.exists():
                quantize = stage.split("-", 1)[1]
                result = measure_server(workdir / f"repository-{quantize}", workdir / f"{stage}.log")
                out.write_text(json.dumps(result | {"preset": args.preset, "machine": _machine()}, indent=2))
        elif stage.startswith("stages-") or stage == "transformers":
            if not out.exists():
                cmd = ["nice", "-n", "10", sys.executable, "-m", "blip2_triton.benchmarks.opt27", "--workdir",
                       str(workdir), "--child", stage]
                lines = []
                with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
                    for line in proc.stdout:
                        lines.append(line)
                        if not line.startswith("{"):
                            print(line.rstrip(), flush=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{stage} failed ({proc.returncode})")
                out.write_text(json.dumps(json.loads(lines[-1]) | {"preset": args.preset, "machine": _machine()}, indent=2))
        else:
            raise SystemExit(f"unknown stage {stage!r}")
        print(summary_table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
