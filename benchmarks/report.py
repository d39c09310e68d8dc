"""Benchmark results -> bench.json (raw numbers), bench.md (tables) and PNG plots.

Everything here reads the JSON-able results dict only, so tables and plots can be remade from a
saved bench.json:  python -m blip2_triton.benchmarks.report benchmarks/results/bench.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("preprocess", "vision_encoder", "qformer", "prefill", "decode", "engine_overhead", "postprocess")
STAGE_COLORS = {
    "preprocess": "#8dd3c7", "vision_encoder": "#80b1d3", "qformer": "#bebada", "prefill": "#fdb462",
    "decode": "#fb8072", "engine_overhead": "#d9d9d9", "postprocess": "#b3de69",
    "batcher queue": "#ffed6f", "BLS, gRPC, engine": "#f4a6a0",
    "transformers to first token": "#a6cee3", "transformers decode": "#1f78b4",
}
SYSTEM_COLORS = {"server": "#d95f02", "in_process": "#fdae6b", "in_process_int8": "#7570b3", "transformers": "#1f78b4"}
EXTRA_BASELINE_COLOR = "#a6cee3"


def label(system: str, threads: int | None = None) -> str:
    """'server' -> 'ours: Triton + gRPC'; 'transformers_1_thread' -> 'transformers, 1 thread'."""
    if system == "server":
        return "ours: Triton + gRPC"
    if system == "in_process":
        return "ours: in-process"
    if system == "in_process_int8":
        return "ours, int8 weights: in-process"
    if system == "transformers":
        return f"transformers, {threads} threads" if threads else "transformers"
    return "transformers, " + system.split("_", 1)[1].replace("_", " ")


def caption_tokens(m: dict) -> int:
    return m["workloads"][0]["max_new_tokens"]


def color(system: str) -> str:
    return SYSTEM_COLORS.get(system, EXTRA_BASELINE_COLOR)


def write(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    for name, model in results["models"].items():
        paths += plots(name, model, out)
    return paths


# ---- markdown -------------------------------------------------------------------------------------

def _f(value, digits: int | None = None) -> str:
    """Numbers as people read them: 3 significant digits below 100, whole numbers above."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if digits is None:
            size = abs(value)
            digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    facts, caps = results["facts"], results["capabilities"]
    s = results["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in facts["packages"].items() if v)
    text = [
        "# blip2-triton bench\n",
        f"`{results.get('command')}` — {facts['date']}, commit `{(facts['git']['commit'] or '?')[:12]}`"
        f"{' (+%d uncommitted files)' % facts['git']['dirty_files'] if facts['git']['dirty_files'] else ''}, "
        f"run time {_f(results.get('run_seconds'), 0)} s.\n",
        f"Machine: {facts['cpu']}, {facts['usable_cores']} usable cores, {facts['memory_gib']} GiB; load average "
        f"{facts['load_average_at_start']} at start, {facts.get('load_average_at_end')} at end (the machine is shared: "
        "systems are measured in turns, never one after the other in blocks). "
        f"Threads: {s['threads']} (torch.set_num_threads, in-process onnxruntime); "
        + "; ".join(f"{k}: {v}" for k, v in facts["threads"].items() if k.startswith("onnxruntime intra_op (server"))
        + ".\n",
        f"Measured: memory read {caps['read_gbps']} GB/s (numpy 1 thread {caps['read_gbps_numpy_1thread']}, "
        f"torch {caps['read_gbps_torch']}), fp32 matmul {caps['matmul_gflops']} GFLOP/s "
        f"(torch {caps['matmul_gflops_torch']}, numpy {caps['matmul_gflops_numpy']}"
        f"{', onnxruntime %s' % caps['matmul_gflops_onnxruntime'] if 'matmul_gflops_onnxruntime' in caps else ''}).\n",
        f"Versions: {versions}, Python {facts['python']}.\n",
        f"Workloads: greedy, min_new_tokens = max_new_tokens (every request generates the same number of tokens); "
        f"{s['reps']} interleaved requests per workload and system after {s['warmup']} warm-up rounds; "
        f"{s['images']} JPEG images 640x480.\n",
    ]
    for name, m in results["models"].items():
        text.append(model_markdown(name, m, s.get("quiet_cores", 0.25)))
    return "\n".join(text)


def model_markdown(name: str, m: dict, quiet_threshold: float = 0.25) -> str:
    e2e, floor = m["end_to_end"], m["floor"]
    caption = next(iter(e2e))
    others = [w[s]["others_cores_mean"] for w in e2e.values() for s in m["systems"]]
    out = [f"## {name}\n", f"{m['model']['source']}; {m['baseline_info']['parameters'] / 1e6:.3g}M parameters; "
           f"transformers attention: {m['baseline_info']['attn_implementation']}. While the single requests ran, "
           f"other users' processes kept {sum(others) / len(others):.2f} cores busy on average.\n"]

    systems = m["systems"]
    threads = m["baseline_info"]["torch_threads"]
    quiet_cores = quiet_threshold
    out.append("### End to end, one request at a time (ms)\n")
    rows = []
    for wname, w in e2e.items():
        n_tokens = next(x["max_new_tokens"] for x in m["workloads"] if x["name"] == wname)
        for system in systems:
            lat = w[system]["latency_ms"]
            ttft = w["server_stream"]["ttft_ms"] if system == "server" else w[system]["ttft_ms"]
            quiet = w[system]["latency_ms_quiet"]
            rows.append([f"{wname} ({n_tokens} tokens)", label(system, threads), lat["p50"], lat["p90"], lat["p99"],
                         lat["n"], ttft.get("p50"), ttft.get("n"), w[system]["tokens_per_s"],
                         w[system]["others_cores_mean"], f"{quiet['n']}/{lat['n']}", quiet.get("p50")])
    out.append(_table(["workload", "system", "p50", "p90", "p99", "n", "TTFT p50", "TTFT n", "tokens/s",
                       "others' cores", "quiet", "quiet p50"], rows))
    out.append("n: requests behind the percentiles (p99 of n requests is their slowest but (n - 1) / 100). "
               "TTFT of the server: streaming requests (time to the first streamed response); of the others: time "
               "to the first token of the same calls. tokens/s = tokens per request / p50 latency. others' cores: "
               "how many cores other users' processes kept busy during this system's requests, on average; quiet: "
               f"requests during which they kept fewer than {quiet_cores} busy, and their p50.\n")
    out.append("### Ours / transformers (below 1 = ours faster)\n")
    baselines = [s for s in systems if s.startswith("transformers")]
    rows = []
    for wname, w in e2e.items():
        r = w["ratios_ours_over_transformers"]
        for b in baselines:
            suffix = "" if b == "transformers" else f"_vs_{b}"
            rows.append([wname, label(b, threads), r[f"server_latency_p50{suffix}"], r[f"in_process_latency_p50{suffix}"],
                         r.get(f"server_latency_p50_quiet{suffix}"), r.get(f"in_process_latency_p50_quiet{suffix}"),
                         r.get(f"server_latency_min{suffix}"), r[f"server_stream_ttft_p50{suffix}"],
                         r[f"in_process_ttft_p50{suffix}"]])
    int8 = "in_process_int8" in systems
    if int8:
        for row, (wname, b) in zip(rows, [(wn, b) for wn in e2e for b in baselines]):
            suffix = "" if b == "transformers" else f"_vs_{b}"
            row += [e2e[wname]["ratios_ours_over_transformers"].get(f"in_process_int8_latency_p50{suffix}"),
                    e2e[wname]["ratios_ours_over_transformers"].get(f"in_process_int8_latency_p50_quiet{suffix}")]
    out.append(_table(["workload", "versus", "server latency p50", "in-process latency p50", "server p50 quiet",
                       "in-process p50 quiet", "server min / min", "server TTFT p50", "in-process TTFT p50",
                       *(["int8 in-process p50", "int8 in-process p50 quiet"] if int8 else [])], rows))
    out.append("quiet: p50 over the requests during which other users' processes kept few cores busy (needs 3 "
               "per system); min / min: each system's fastest request.\n")

    ident = m["tokens_identical"]
    out.append(f"**Tokens identical to transformers:** {'yes' if ident['all'] else 'NO'} "
               f"({ident['compared']} requests compared, {len(ident['mismatches'])} mismatches; "
               f"{ident['distinct_tokens_in_reference']} distinct token ids in the reference outputs).\n")
    if "int8_agreement" in m:
        a = m["int8_agreement"]
        out.append(f"**int8 weights vs fp32 transformers:** {a['identical']} of {a['compared']} requests generate the "
                   f"same tokens; on average {100 * (a['mean_agreeing_prefix'] or 0):.0f}% of a request's tokens agree "
                   "before the first difference (int8 is not meant to be token-exact; accuracy on the trained model "
                   "is in its model card).\n")

    st = m["stages"]
    w = m["decoder_weights"]
    out.append("### Decode step vs the floor (batch 1)\n")
    out.append(f"The decoder reads {w['bytes_read_per_step'] / 2**20:.0f} MiB of weights per step "
               f"({w['matmul_params'] / 1e6:.0f}M matmul parameters): floor {floor['bandwidth_floor_ms']} ms from "
               f"bandwidth, {floor['compute_floor_ms']} ms from compute, so {floor['floor_ms']} ms "
               f"({floor['bound_by']}).\n")
    steps = [("ours in-process: one decoder-graph call (median)", st["in_process"][caption].get("decode_step_median_ms")),
             ("ours in-process: decode time / steps", e2e[caption]["in_process"]["decode_step_ms"].get("p50")),
             ("ours server: first to last streamed token / steps", e2e[caption]["server_stream"]["decode_step_ms"].get("p50"))]
    steps += [(f"{label(b, threads)}: first to last token / steps", e2e[caption][b]["decode_step_ms"].get("p50"))
              for b in systems if b.startswith("transformers")]
    rows = [[k, v, (v / floor["floor_ms"]) if v else None] for k, v in steps]
    if "floor_int8" in m:
        f8, w8 = m["floor_int8"], m["decoder_weights_int8"]
        v = e2e[caption]["in_process_int8"]["decode_step_ms"].get("p50")
        rows.append([f"ours int8 in-process: decode time / steps (floor {f8['floor_ms']} ms: "
                     f"{w8['bytes_read_per_step'] / 2**20:.0f} MiB per step)", v, (v / f8["floor_ms"]) if v else None])
    out.append(_table(["system (p50 over requests)", "ms per step", "× floor"], rows))
    out.append("Below 1 × floor would mean the bandwidth probe was slowed by other load (it is the best of a "
               "measurement at the start and one at the end of the run). The server's streamed tokens can arrive "
               "bunched (gRPC may coalesce them), which shortens first-to-last; "
               "for the tiny model that, not the decoder, is what this row measures.\n")
    side = m.get("floor_side_by_side", {})
    if side:
        out.append("Side by side: each round of the decode-vs-rows measurement (below) follows a bandwidth probe of "
                   "its own, and the ratio is taken per round, so a change in the machine's memory bandwidth during "
                   "the run moves the step and its floor together.\n")
        out.append(_table(["decoder call, 1 row", "rounds", "ms per step (median)", "read GB/s (min-max)",
                           "× floor of its round: median", "min", "max"],
                          [[name, r["rounds"], r["step_ms_median"], f"{r['read_gbps_min']:.1f}-{r['read_gbps_max']:.1f}",
                            r["ratio_median"], r["ratio_min"], r["ratio_max"]]
                           for name, r in (("ours in-process, fp32" if k == "in_process" else "ours in-process, int8", v)
                                           for k, v in side.items())]))

    out.append("### Where the time goes, in process (median ms per request)\n")
    keys = [*STAGES, "total"]
    out.append(_table(["workload", *keys],
                      [[w, *[v.get(f"{k}_ms") for k in keys]] for w, v in st["in_process"].items()]))
    out.append(f"Decode is {st['in_process'][caption]['decode_steps']} steps after the prefill's first token. "
               "engine_overhead = generation engine time outside decoder calls (search, cache bookkeeping).\n")

    out.append("### Server side, per workload (the single requests; ms per request unless named)\n")
    out.append("Triton's statistics of each model, read before and after every request of the workload:\n")
    out.append(_table(["workload", "model", "requests", "mean batch", "queue", "compute input", "compute infer",
                       "compute output"],
                      [[w, k + (" (public model: execute() only enqueues)" if k == "blip2" else ""), v["requests"],
                        v["mean_batch"], v["queue_ms"], v["compute_input_ms"], v["compute_infer_ms"], v["compute_output_ms"]]
                       for w, server in st["server"].items() for k, v in server["models"].items()]))
    out.append("The `blip2` model's engine, from its metrics (blip2_*_seconds_sum / _count) over the same requests:\n")
    out.append(_table(["workload", "time to first token", "prefill", "decode step (mean)", "decode steps",
                       "detokenize (mean)", "detokenizations / request", "tokens"],
                      [[w, g["engine_ttft_ms"], g.get("prefill_ms"), g.get("decode_step_ms"), g["decode_steps"],
                        g.get("detokenize_ms"), g.get("detokenize_per_request"), g["generated_tokens"]]
                       for w, g in ((w, server["generator_metrics"]) for w, server in st["server"].items())]))
    out.append("Time to first token counts from `blip2`'s execute() receiving the request: preprocess, vision "
               "encoder and Q-Former (BLS calls), the engine's queue and the prefill. The requests are not "
               "streamed: one detokenization each, of the whole text.\n")

    floors = m.get("stage_floors")
    if floors:
        out.append("### How close each stage comes to its floor (batch 1)\n")
        out.append(_table(["workload", "stage", "MFLOP", "compute floor", "bytes floor", "floor", "bound by",
                           "in-process", "× floor", "server", "× floor"],
                          [[w, stage, f["gflops"] * 1e3, f["compute_floor_ms"], f["bytes_floor_ms"], f["floor_ms"], f["bound_by"],
                            f["in_process_ms"], f["in_process_over_floor"], f["server_ms"], f["server_over_floor"]]
                           for w, by_stage in floors.items() for stage, f in by_stage.items()]))
        out.append("FLOPs are counted on the exported ONNX graph at the workload's shapes (MatMul, Gemm, Conv, fused "
                   "attention; `benchmarks/flops.py`) and divided by the best measured fp32 matmul rate; the bytes "
                   "floor is the graph's weights at the best measured read bandwidth. In-process: median; server: "
                   "Triton's compute time (vision encoder, Q-Former) and the engine's prefill metric, means. The "
                   "decode step's floor is in \"Decode step vs the floor\" above.\n")

    out.append("### Decode step vs batch rows (in-process, ms)\n")
    precisions = [(k, p) for k, p in (("decode_step_vs_rows", ""), ("decode_step_vs_rows_int8", "int8 ")) if st.get(k)]
    header, columns = ["rows"], []
    for key, prefix in precisions:
        by_rows = {d["rows"]: d for d in st[key]}
        header += [f"{prefix}step", f"{prefix}per token", f"{prefix}tokens/s vs 1 row"]
        columns.append([[d["step_ms"], d["ms_per_token"],
                         by_rows[1]["ms_per_token"] / d["ms_per_token"] if 1 in by_rows else None] for d in st[key]])
    out.append(_table(header, [[d["rows"], *[c for col in columns for c in col[i]]]
                               for i, d in enumerate(st["decode_step_vs_rows"])]))

    out.append(f"### Throughput vs concurrency ({caption}, through the server)\n")
    batch = lambda t, k: t.get("server", {}).get("models", {}).get(k, {}).get("mean_batch")  # noqa: E731

    def busy(t: dict, k: str) -> float | None:
        """Share of the phase one instance of model k spent computing: executions/s x compute per execution."""
        v = t.get("server", {}).get("models", {}).get(k)
        return t["requests_per_s"] / v["mean_batch"] * v["compute_infer_ms"] / 1e3 if v and v["mean_batch"] else None

    out.append(_table(["streams", "requests", "requests/s", "tokens/s", "latency p50", "latency p90",
                       "vision batch", "preprocess busy", "decode rows / step", "our cores busy", "our CPU ms / request",
                       "others' cores"],
                      [[t["streams"], t["requests"], t["requests_per_s"], t["tokens_per_s"], t["latency_ms"]["p50"],
                        t["latency_ms"]["p90"], batch(t, "vision_encoder"), busy(t, "preprocess"),
                        t.get("server", {}).get("decode_rows_per_step"), t.get("our_cores"),
                        t["our_cores"] / t["requests_per_s"] * 1e3 if t.get("our_cores") else None,
                        t.get("others_cores")] for t in m["throughput"]]))
    out.append("requests: behind the latency percentiles. vision batch: mean batch the dynamic batcher formed for the "
               "vision encoder; preprocess busy: share of the time the one `preprocess` instance was computing "
               "(near 1: it is the bottleneck); decode rows / step: mean sequences per batched decoder call (the "
               "continuous batcher); our cores busy: CPU time of the server, the client and the benchmark's idle "
               "workers over the phase's wall time; our CPU ms / request: the same per request served (the "
               "bound below counts only the in-process stages).\n")
    tb = m.get("throughput_bound")
    if tb:
        out.append(f"Bound from the per-request CPU cost: {tb['once_ms']:.0f} ms of preprocess + vision + Q-Former + "
                   f"prefill (in-process medians, each using every core) + {caption_tokens(m)} tokens × "
                   f"{tb['decode_ms_per_token']} ms (decode per token at {tb['rows']} rows) = {tb['request_cost_ms']:.0f} ms "
                   f"→ {tb['bound_requests_per_s']:.2f} requests/s. Measured with {tb['streams']} streams: "
                   f"{_f(tb['measured_requests_per_s'])} requests/s = **{_f(tb['measured_over_bound'])} × the bound**.\n")
    if m.get("baseline_batches"):
        out.append("transformers, static batches (one generate() over N images):\n")
        out.append(_table(["batch", "seconds", "requests/s", "tokens/s", "others' cores"],
                          [[b["batch"], b["seconds"], b["requests_per_s"], b["tokens_per_s"], b.get("others_cores")]
                           for b in m["baseline_batches"]]))

    out.append("### Overhead of Triton + gRPC + BLS over the in-process pipeline (ms)\n")
    out.append(_table(["workload", "p50 server − p50 in-process", "same, quiet requests", "median paired difference",
                       "relative"],
                      [[w, v["server_overhead_ms"]["p50_difference"], v["server_overhead_ms"].get("p50_quiet_difference"),
                        v["server_overhead_ms"]["paired_median"], v["server_overhead_ms"]["relative_to_in_process"]]
                       for w, v in e2e.items()]))
    out.append("Under load from other users the server can come out ahead: its models run in several processes "
               "with more runnable threads than one in-process worker, so the kernel's per-thread fairness gives "
               "it a larger share of the contended cores. The quiet column is the one to read.\n")

    mem = m["memory"]
    out.append("### Memory (MiB)\n")
    worker_rss = [(k[: -len("_peak_rss_mib")], v) for k, v in mem.items()
                  if k.endswith("_peak_rss_mib") and not k.startswith("server")]
    out.append(_table(["server peak RSS (sum over process group)", "server PSS at end",
                       *[f"{label(k, threads)} peak RSS" for k, _ in worker_rss]],
                      [[mem["server_peak_rss_mib"], mem["server_pss_at_end_mib"], *[v for _, v in worker_rss]]]))
    out.append("Server peak RSS by process: " + ", ".join(f"{k} {v}" for k, v in mem["server_peak_rss_by_process_mib"].items())
               + ".\n")

    pa = m.get("perf_analyzer", {})
    out.append("### perf_analyzer cross-check\n")
    if pa.get("ok"):
        out.append(_table(["concurrency", "requests/s", "tokens/s", "p50", "p90", "p99"],
                          [[r["concurrency"], r["requests_per_s"], r["tokens_per_s"], r["p50_ms"], r["p90_ms"],
                            r["p99_ms"]] for r in pa["rows"]]))
        out.append(f"`{' '.join(pa['command'])}`\n")
    else:
        out.append(f"Not available: {pa.get('skipped') or pa.get('error')}\n")
    return "\n".join(out)


# ---- plots ----------------------------------------------------------------------------------------

def plots(name: str, m: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    return [stage_plot(name, m, out), throughput_plot(name, m, out), comparison_plot(name, m, out)]


def _stacked(ax, y: float, parts: list[tuple[str, float]], seen: set) -> None:
    left = 0.0
    for part, value in parts:
        if value is None or value <= 0:
            continue
        ax.barh(y, value, left=left, color=STAGE_COLORS[part], edgecolor="white", linewidth=0.5,
                label=part if part not in seen else None)
        seen.add(part)
        left += value
    ax.text(left, y, f" {left:,.0f} ms", va="center", fontsize=8)


def stage_plot(name: str, m: dict, out: Path) -> Path:
    """Per workload, one bar per system: in-process stages (timed in the same calls as its
    latency), the server's parts from Triton's statistics and the generator's metrics (the
    remainder of its p50 is decode, detokenization, the BLS hops and gRPC), transformers' time to
    first token and decode."""
    import matplotlib.pyplot as plt

    e2e, st = m["end_to_end"], m["stages"]
    workloads = list(e2e)
    threads = m["baseline_info"]["torch_threads"]
    baselines = [s for s in m["systems"] if s.startswith("transformers")]
    rows = 2 + len(baselines)
    fig, axes = plt.subplots(len(workloads), 1, figsize=(10, 1.6 + (0.5 + 0.42 * rows) * len(workloads)), squeeze=False)
    seen: set = set()
    for ax, w in zip(axes[:, 0], workloads):
        stages = st["in_process"][w]
        inproc = [(k, stages.get(f"{k}_ms")) for k in STAGES]
        models, g = st["server"][w]["models"], st["server"][w]["generator_metrics"]
        compute = lambda k: (models[k]["compute_input_ms"] + models[k]["compute_infer_ms"] + models[k]["compute_output_ms"]  # noqa: E731
                             if k in models else None)
        queue = sum(models[k]["queue_ms"] for k in ("preprocess", "vision_encoder", "qformer") if k in models)
        per_request = lambda ms, runs: ms * runs / g["prefills"] if ms is not None and runs and g["prefills"] else None  # noqa: E731
        server_parts = [("preprocess", compute("preprocess")), ("vision_encoder", compute("vision_encoder")),
                        ("qformer", compute("qformer")), ("batcher queue", queue), ("prefill", g.get("prefill_ms")),
                        ("decode", per_request(g.get("decode_step_ms"), g["decode_steps"])),
                        ("postprocess", per_request(g.get("detokenize_ms"), (g.get("detokenize_per_request") or 0) * g["prefills"]))]
        known = sum(v for _, v in server_parts if v)
        server_parts.append(("BLS, gRPC, engine", e2e[w]["server"]["latency_ms"]["p50"] - known))
        y = rows - 1
        _stacked(ax, y, server_parts, seen)
        _stacked(ax, y - 1, inproc, seen)
        ticks = [(y, "ours: Triton + gRPC (p50)"), (y - 1, "ours: in-process (medians)")]
        for i, b in enumerate(baselines):
            theirs = e2e[w][b]
            ttft = theirs["ttft_ms"]["p50"]
            _stacked(ax, y - 2 - i, [("transformers to first token", ttft),
                                     ("transformers decode", theirs["latency_ms"]["p50"] - ttft)], seen)
            ticks.append((y - 2 - i, f"{label(b, threads)} (p50)"))
        ax.set_yticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=8)
        tokens = next(x["max_new_tokens"] for x in m["workloads"] if x["name"] == w)
        ax.set_title(f"{w}: {tokens} new tokens", fontsize=10, loc="left")
        ax.set_xlabel("ms")
        ax.margins(x=0.12)
    handles, labels = [], []
    for ax in axes[:, 0]:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{name}: where the time of one request goes (server parts: Triton statistics and the engine's "
                 "metrics, means over the workload's requests)", fontsize=10)
    fig.tight_layout(rect=(0, 0.13, 1, 0.97))
    path = out / f"{name}_stages.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_plot(name: str, m: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt

    t = m["throughput"]
    streams = [x["streams"] for x in t]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(streams, [x["tokens_per_s"] for x in t], "o-", color=color("server"),
             label="ours (Triton, continuous batching): concurrent streams")
    b = m.get("baseline_batches") or []
    if b:
        ax1.plot([x["batch"] for x in b], [x["tokens_per_s"] for x in b], "s--", color=color("transformers"),
                 label="transformers generate(): static batch of N")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(sorted(set(streams) | {x["batch"] for x in b}))
    ax1.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    ax1.set_xlabel("concurrent streams / batch size")
    ax1.set_ylabel("generated tokens per second")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("throughput", fontsize=10)
    ax2.plot(streams, [x["latency_ms"]["p50"] / 1e3 for x in t], "o-", color=color("server"), label="p50")
    ax2.plot(streams, [x["latency_ms"]["p90"] / 1e3 for x in t], "o:", color=color("server"), alpha=0.6,
             label="p90")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(streams)
    ax2.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    ax2.set_xlabel("concurrent streams")
    ax2.set_ylabel("request latency (s)")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    ax2.set_title("latency under load (ours)", fontsize=10)
    tokens = next(x["max_new_tokens"] for x in m["workloads"])
    fig.suptitle(f"{name}: captions of {tokens} tokens", fontsize=11)
    fig.tight_layout()
    path = out / f"{name}_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_plot(name: str, m: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    e2e = m["end_to_end"]
    workloads = list(e2e)
    systems = m["systems"]
    threads = m["baseline_info"]["torch_threads"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.3), gridspec_kw={"width_ratios": [3, 2]})
    groups = [(f"{w}\nlatency", w, "latency") for w in workloads] + [(f"{w}\nfirst token", w, "ttft") for w in workloads]
    x = np.arange(len(groups))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        values = []
        for _, w, kind in groups:
            if kind == "latency":
                values.append(e2e[w][system]["latency_ms"]["p50"])
            else:
                source = e2e[w]["server_stream"] if system == "server" else e2e[w][system]
                values.append(source["ttft_ms"].get("p50"))
        offsets = x + (i - (len(systems) - 1) / 2) * width
        bars = ax1.bar(offsets, [v or 0 for v in values], width, color=color(system), label=label(system, threads))
        ax1.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in values], fontsize=6.5, padding=1)
        quiet = [e2e[w][system]["latency_ms_quiet"] if kind == "latency" else {} for _, w, kind in groups]
        qx = [o for o, q in zip(offsets, quiet) if q.get("n", 0) >= 3]
        qy = [q["p50"] for q in quiet if q.get("n", 0) >= 3]
        if qx:
            ax1.scatter(qx, qy, marker="_", s=120, color="black", linewidths=2, zorder=3,
                        label="p50 of quiet requests" if "p50 of quiet requests" not in ax1.get_legend_handles_labels()[1]
                        else None)
    ax1.set_xticks(x, [g[0] for g in groups], fontsize=8)
    ax1.set_ylabel("ms (p50)")
    ax1.set_ylim(0, ax1.get_ylim()[1] * 1.45)  # room for the legend above the bars
    ax1.legend(fontsize=8, loc="upper left", ncol=2)
    ax1.set_title("one request at a time (lower is better)", fontsize=10)
    ax1.grid(axis="y", alpha=0.3)

    caption = workloads[0]
    names = ["ours\nin-process", "ours server\n(streamed)"]
    values = [e2e[caption]["in_process"]["decode_step_ms"].get("p50"),
              e2e[caption]["server_stream"]["decode_step_ms"].get("p50")]
    colors = [color("in_process"), color("server")]
    for b in (s for s in systems if s.startswith("transformers")):
        names.append(label(b, threads).replace(", ", "\n"))
        values.append(e2e[caption][b]["decode_step_ms"].get("p50"))
        colors.append(color(b))
    bars = ax2.bar(names, [v or 0 for v in values], color=colors)
    ax2.bar_label(bars, labels=[f"{v:.1f}" if v else "" for v in values], fontsize=8)
    floor = m["floor"]
    ax2.axhline(floor["floor_ms"], color="black", linestyle="--", linewidth=1,
                label=f"floor {floor['floor_ms']:.2f} ms ({floor['bound_by']})")
    ax2.set_ylim(0, max([floor["floor_ms"], *[v or 0 for v in values]]) * 1.3)
    ax2.legend(fontsize=8, loc="upper left")
    ax2.set_ylabel("ms per decode step (batch 1, p50)")
    ax2.set_title(f"decode step vs the floor ({caption})", fontsize=10)
    ax2.tick_params(axis="x", labelsize=7.5)
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{name}: ours vs transformers generate() (same weights; {threads} threads unless named)", fontsize=11)
    fig.tight_layout()
    path = out / f"{name}_vs_transformers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    source = Path(sys.argv[1])
    for p in write(json.loads(source.read_text()), source.parent):
        print(p)
