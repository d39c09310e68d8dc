"""Benchmark results -> bench.json (raw numbers), bench.md (tables) and PNG plots.

Everything here reads bench.json's dict through its records (records.py), so tables and plots can
be remade from a saved file, older ones included:
    python -m blip2_triton.benchmarks.report benchmarks/results/bench.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .records import IMAGE_STAGES, INT8, STAGES, BenchResults, ModelResult
from .tables import fmt, label, table

STAGE_COLORS = {
    "preprocess": "#8dd3c7", "vision_encoder": "#80b1d3", "qformer": "#bebada", "prefill": "#fdb462",
    "decode": "#fb8072", "engine_overhead": "#d9d9d9", "postprocess": "#b3de69",
    "batcher queue": "#ffed6f", "BLS, gRPC, engine": "#f4a6a0",
    "transformers to first token": "#a6cee3", "transformers decode": "#1f78b4",
}
SYSTEM_COLORS = {"server": "#d95f02", "in_process": "#fdae6b", "in_process_int8": "#7570b3", "transformers": "#1f78b4"}
EXTRA_BASELINE_COLOR = "#a6cee3"
MIB = 2**20


def color(system: str) -> str:
    return SYSTEM_COLORS.get(system, EXTRA_BASELINE_COLOR)


def write(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    for name, model in BenchResults.from_dict(results).models.items():
        paths += plots(name, model, out)
    return paths


# ---- markdown -------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    bench = BenchResults.from_dict(results)
    facts, caps, s = bench.facts, bench.capabilities, bench.settings
    versions = ", ".join(f"{k} {v}" for k, v in facts["packages"].items() if v)
    dirty = facts["git"]["dirty_files"]
    text = [
        "# blip2-triton bench\n",
        f"`{bench.command}` — {facts['date']}, commit `{(facts['git']['commit'] or '?')[:12]}`"
        f"{' (+%d uncommitted files)' % dirty if dirty else ''}, run time {fmt(bench.run_seconds, 0)} s.\n",
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
    if len(bench.models) > 1:
        text.append(side_by_side(bench.models))
    for name, m in bench.models.items():
        text.append(model_markdown(name, m, s.get("quiet_cores", 0.25)))
    return "\n".join(text)


def _step_reads(m: ModelResult, int8: bool = False) -> tuple[float, float, float] | None:
    """MiB a decode step reads: weights, self-attention cache, cross-attention keys and values
    (None for results from before the step's cost was counted)."""
    cost = m.graph_costs.get("decode_step:int8" if int8 else "decode_step")
    if cost is None:
        return None
    cached = cost.input_bytes_read or {}
    return (cost.weight_bytes_read / MIB, cached.get("max_sequence_length", 0) / MIB,
            cached.get("encoder_sequence_length", 0) / MIB)


def side_by_side(models: dict[str, ModelResult]) -> str:
    """The headline numbers of every model in one table."""
    rows = []
    for name, m in models.items():
        w = m.end_to_end.workloads[m.caption]
        r = w.ratios_ours_over_transformers.by_baseline["transformers"]
        step = m.stages.in_process[m.caption].decode_step_median_ms
        reads = _step_reads(m)
        side = (m.floor_side_by_side or {}).get("in_process")
        prefill = m.stage_floors.workloads[m.caption]["prefill"] if m.stage_floors else None
        rows.append([name, w.systems["server"].latency_ms.p50, w.systems["transformers"].latency_ms.p50,
                     r.server_latency_p50, "yes" if m.tokens_identical.all else "NO",
                     " + ".join(f"{x:.0f}" if x >= 10 else f"{x:.1f}" for x in reads) if reads else "–",
                     m.floor.floor_ms, step, step / m.floor.floor_ms if step else None,
                     side.ratio_median if side else None, prefill.floor_ms if prefill else None,
                     prefill.server_over_floor if prefill else None])
    return ("## Models side by side (captions)\n\n"
            + table(["model", "server p50", "transformers p50", "ours / transformers", "tokens identical",
                     "decode step reads (MiB: weights + self-attn cache + cross-attn K/V)", "step floor",
                     "step (one call, median)", "× floor", "× floor of its round (median)", "prefill floor",
                     "prefill on the server × floor"], rows)
            + "\nms unless named. The decode step is the in-process decoder call, batch 1, in the middle of a "
            "caption; its floor counts every byte it reads (the decoder's weights, the self-attention cache, and "
            "for an encoder-decoder LM the cross-attention keys and values over the query embeddings and the "
            "prompt) at the best measured read bandwidth. The prefill is every LM graph run before the first "
            "token (an encoder-decoder LM: its encoder and the decoder's first step). Per model below.\n")


def model_markdown(name: str, m: ModelResult, quiet_cores: float = 0.25) -> str:
    e2e = m.end_to_end
    others = [s.others_cores_mean for w in e2e.workloads.values() for s in w.systems.values()]
    tokens = {w["name"]: w["max_new_tokens"] for w in m.workloads}
    out = [f"## {name}\n", f"{m.model['source']}; {m.baseline_info['parameters'] / 1e6:.3g}M parameters; "
           f"transformers attention: {m.baseline_info['attn_implementation']}. While the single requests ran, "
           f"other users' processes kept {sum(others) / len(others):.2f} cores busy on average.\n",
           "### End to end, one request at a time (ms)\n", e2e.latency_table(tokens, m.threads, quiet_cores),
           "### Ours / transformers (below 1 = ours faster)\n", e2e.ratio_table(m.threads),
           m.tokens_identical.markdown()]
    if m.int8_agreement:
        out.append(m.int8_agreement.markdown())
    out += decode_floor_section(m)
    out += ["### Where the time goes, in process (median ms per request)\n", m.stages.in_process_table(),
            f"Decode is {m.stages.in_process[m.caption].decode_steps} steps after the prefill's first token. "
            "engine_overhead = generation engine time outside decoder calls (search, cache bookkeeping).\n",
            "### Server side, per workload (the single requests; ms per request unless named)\n",
            m.stages.server_tables(),
            "Time to first token counts from `blip2`'s execute() receiving the request: preprocess, vision "
            "encoder and Q-Former (BLS calls), the engine's queue and the prefill. The requests are not "
            "streamed: one detokenization each, of the whole text.\n"]
    if m.stage_floors:
        out += ["### How close each stage comes to its floor (batch 1)\n", m.stage_floors.table(),
                "FLOPs are counted on the exported ONNX graph at the workload's shapes (MatMul, Gemm, Conv, fused "
                "attention; `benchmarks/flops.py`) and divided by the best measured fp32 matmul rate; the bytes "
                "floor is the graph's weights at the best measured read bandwidth. In-process: median; server: "
                "Triton's compute time (vision encoder, Q-Former) and the engine's prefill metric, means. The "
                "prefill is every LM graph run before the first token (an encoder-decoder LM: its encoder and its "
                "decoder's first step). The decode step's floor is in \"Decode step vs the floor\" above.\n"]
    out += ["### Decode step vs batch rows (in-process, ms)\n", m.stages.decode.table()]
    out += throughput_section(m)
    out += ["### Overhead of Triton + gRPC + BLS over the in-process pipeline (ms)\n", e2e.overhead_table(),
            "### Memory (MiB)\n", m.memory.markdown(m.threads),
            "### perf_analyzer cross-check\n", m.perf_analyzer.markdown()]
    return "\n".join(out)


def _reads_sentence(m: ModelResult) -> str:
    """What one decode step reads, and its floor."""
    floor, w = m.floor, m.decoder_weights
    what = f"The decoder's weights: {w.bytes_read_per_step / MIB:.0f} MiB read per step ({w.matmul_params / 1e6:.0f}M matmul parameters)"
    reads = _step_reads(m)
    if reads:  # results from before the cached keys and values were counted have weights only
        what += (f". A step {m.stages.decode.decode_step_past_length} positions deep (mid-caption) also reads "
                 f"{reads[1]:.1f} MiB of self-attention cache")
        what += f" and {reads[2]:.1f} MiB of cross-attention keys and values" if reads[2] else ""
    return (f"{what}: floor {floor.bandwidth_floor_ms} ms from bandwidth, {floor.compute_floor_ms} ms from compute, "
            f"so {floor.floor_ms} ms ({floor.bound_by}).\n")


def decode_floor_section(m: ModelResult) -> list[str]:
    caption = m.end_to_end.workloads[m.caption]
    floor = m.floor.floor_ms
    steps = [("ours in-process: one decoder-graph call (median)", m.stages.in_process[m.caption].decode_step_median_ms),
             ("ours in-process: decode time / steps", caption.systems["in_process"].decode_step_ms.p50),
             ("ours server: first to last streamed token / steps", caption.server_stream.decode_step_ms.p50)]
    steps += [(f"{label(b, m.threads)}: first to last token / steps", s.decode_step_ms.p50)
              for b, s in caption.systems.items() if b.startswith("transformers")]
    rows = [[k, v, (v / floor) if v else None] for k, v in steps]
    if m.floor_int8:
        reads = _step_reads(m, int8=True)
        mib = sum(reads) if reads else m.decoder_weights_int8.bytes_read_per_step / MIB
        v = caption.systems[INT8].decode_step_ms.p50
        rows.append([f"ours int8 in-process: decode time / steps (floor {m.floor_int8.floor_ms} ms: "
                     f"{mib:.0f} MiB per step)", v, (v / m.floor_int8.floor_ms) if v else None])
    out = ["### Decode step vs the floor (batch 1)\n", _reads_sentence(m),
           table(["system (p50 over requests)", "ms per step", "× floor"], rows),
           "Below 1 × floor would mean the bandwidth probe was slowed by other load (it is the best of a "
           "measurement at the start and one at the end of the run). The server's streamed tokens can arrive "
           "bunched (gRPC may coalesce them), which shortens first-to-last; "
           "for the tiny model that, not the decoder, is what this row measures.\n"]
    if m.floor_side_by_side:
        out.append("Side by side: each round of the decode-vs-rows measurement (below) follows a bandwidth probe of "
                   "its own, and the ratio is taken per round, so a change in the machine's memory bandwidth during "
                   "the run moves the step and its floor together.\n")
        out.append(table(["decoder call, 1 row", "rounds", "ms per step (median)", "read GB/s (min-max)",
                          "× floor of its round: median", "min", "max"],
                         [["ours in-process, " + ("int8" if k == INT8 else "fp32"), r.rounds, r.step_ms_median,
                           f"{r.read_gbps_min:.1f}-{r.read_gbps_max:.1f}", r.ratio_median, r.ratio_min, r.ratio_max]
                          for k, r in m.floor_side_by_side.items()]))
    return out


def throughput_section(m: ModelResult) -> list[str]:
    out = [f"### Throughput vs concurrency ({m.caption}, through the server)\n",
           table(["streams", "requests", "requests/s", "tokens/s", "latency p50", "latency p90", "vision batch",
                  "preprocess busy", "decode rows / step", "our cores busy", "our CPU ms / request", "others' cores"],
                 [t.row() for t in m.throughput]),
           "requests: behind the latency percentiles. vision batch: mean batch the dynamic batcher formed for the "
           "vision encoder; preprocess busy: share of the time the one `preprocess` instance was computing "
           "(near 1: it is the bottleneck); decode rows / step: mean sequences per batched decoder call (the "
           "continuous batcher); our cores busy: CPU time of the server, the client and the benchmark's idle "
           "workers over the phase's wall time; our CPU ms / request: the same per request served (the "
           "bound below counts only the in-process stages).\n"]
    if m.throughput_bound:
        out.append(m.throughput_bound.markdown(m.tokens()))
    if m.baseline_batches:
        out.append("transformers, static batches (one generate() over N images):\n")
        out.append(table(["batch", "seconds", "requests/s", "tokens/s", "others' cores"],
                         [[b.batch, b.seconds, b.requests_per_s, b.tokens_per_s, b.others_cores]
                          for b in m.baseline_batches]))
    return out


# ---- plots ----------------------------------------------------------------------------------------

def plots(name: str, m: ModelResult, out: Path) -> list[Path]:
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


def stage_plot(name: str, m: ModelResult, out: Path) -> Path:
    """Per workload, one bar per system: in-process stages (timed in the same calls as its
    latency), the server's parts from Triton's statistics and the generator's metrics (the
    remainder of its p50 is decode, detokenization, the BLS hops and gRPC), transformers' time to
    first token and decode."""
    import matplotlib.pyplot as plt

    e2e, st = m.end_to_end.workloads, m.stages
    workloads = list(e2e)
    threads = m.threads
    baselines = [s for s in m.systems if s.startswith("transformers")]
    rows = 2 + len(baselines)
    fig, axes = plt.subplots(len(workloads), 1, figsize=(10, 1.6 + (0.5 + 0.42 * rows) * len(workloads)), squeeze=False)
    seen: set = set()
    for ax, w in zip(axes[:, 0], workloads):
        inproc = [(k, getattr(st.in_process[w], f"{k}_ms")) for k in STAGES]
        y = rows - 1
        _stacked(ax, y, _server_parts(st.server[w], e2e[w].systems["server"].latency_ms.p50), seen)
        _stacked(ax, y - 1, inproc, seen)
        ticks = [(y, "ours: Triton + gRPC (p50)"), (y - 1, "ours: in-process (medians)")]
        for i, b in enumerate(baselines):
            theirs = e2e[w].systems[b]
            ttft = theirs.ttft_ms.p50
            _stacked(ax, y - 2 - i, [("transformers to first token", ttft),
                                     ("transformers decode", theirs.latency_ms.p50 - ttft)], seen)
            ticks.append((y - 2 - i, f"{label(b, threads)} (p50)"))
        ax.set_yticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=8)
        ax.set_title(f"{w}: {m.tokens(w)} new tokens", fontsize=10, loc="left")
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


def _server_parts(server, p50: float) -> list[tuple[str, float | None]]:
    """The server's parts of one request (ms): Triton's compute of each image stage, their queues,
    the engine's prefill, decode and detokenization, and the rest of the p50 (BLS, gRPC, engine)."""
    models, g = server.models, server.generator_metrics
    compute = lambda k: (models[k].compute_input_ms + models[k].compute_infer_ms + models[k].compute_output_ms  # noqa: E731
                         if k in models else None)
    queue = sum(models[k].queue_ms for k in IMAGE_STAGES if k in models)
    per_request = lambda ms, runs: ms * runs / g.prefills if ms is not None and runs and g.prefills else None  # noqa: E731
    parts = [("preprocess", compute("preprocess")), ("vision_encoder", compute("vision_encoder")),
             ("qformer", compute("qformer")), ("batcher queue", queue), ("prefill", g.prefill_ms),
             ("decode", per_request(g.decode_step_ms, g.decode_steps)),
             ("postprocess", per_request(g.detokenize_ms, (g.detokenize_per_request or 0) * g.prefills))]
    return parts + [("BLS, gRPC, engine", p50 - sum(v for _, v in parts if v))]


def throughput_plot(name: str, m: ModelResult, out: Path) -> Path:
    import matplotlib.pyplot as plt

    t = m.throughput
    streams = [x.streams for x in t]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(streams, [x.tokens_per_s for x in t], "o-", color=color("server"),
             label="ours (Triton, continuous batching): concurrent streams")
    b = m.baseline_batches or []
    if b:
        ax1.plot([x.batch for x in b], [x.tokens_per_s for x in b], "s--", color=color("transformers"),
                 label="transformers generate(): static batch of N")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(sorted(set(streams) | {x.batch for x in b}))
    ax1.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    ax1.set_xlabel("concurrent streams / batch size")
    ax1.set_ylabel("generated tokens per second")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("throughput", fontsize=10)
    ax2.plot(streams, [x.latency_ms.p50 / 1e3 for x in t], "o-", color=color("server"), label="p50")
    ax2.plot(streams, [x.latency_ms.p90 / 1e3 for x in t], "o:", color=color("server"), alpha=0.6,
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
    fig.suptitle(f"{name}: captions of {m.tokens()} tokens", fontsize=11)
    fig.tight_layout()
    path = out / f"{name}_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_plot(name: str, m: ModelResult, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.3), gridspec_kw={"width_ratios": [3, 2]})
    _latency_bars(ax1, m)
    _decode_bars(ax2, m)
    fig.suptitle(f"{name}: ours vs transformers generate() (same weights; {m.threads} threads unless named)",
                 fontsize=11)
    fig.tight_layout()
    path = out / f"{name}_vs_transformers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency_bars(ax, m: ModelResult) -> None:
    """Per workload, each system's p50 latency and time to first token, with the quiet requests' p50."""
    import numpy as np

    e2e = m.end_to_end.workloads
    groups = [(f"{w}\nlatency", w, "latency") for w in e2e] + [(f"{w}\nfirst token", w, "ttft") for w in e2e]
    x = np.arange(len(groups))
    width = 0.8 / len(m.systems)
    for i, system in enumerate(m.systems):
        values = []
        for _, w, kind in groups:
            s = e2e[w].systems[system]
            if kind == "latency":
                values.append(s.latency_ms.p50)
            else:
                values.append((e2e[w].server_stream.ttft_ms if system == "server" else s.ttft_ms).p50)
        offsets = x + (i - (len(m.systems) - 1) / 2) * width
        bars = ax.bar(offsets, [v or 0 for v in values], width, color=color(system), label=label(system, m.threads))
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in values], fontsize=6.5, padding=1)
        quiet = [(o, e2e[w].systems[system].latency_ms_quiet.quiet_p50) for o, (_, w, kind) in zip(offsets, groups)
                 if kind == "latency"]
        quiet = [(o, q) for o, q in quiet if q is not None]
        if quiet:
            ax.scatter([o for o, _ in quiet], [q for _, q in quiet], marker="_", s=120, color="black", linewidths=2,
                       zorder=3, label="p50 of quiet requests"
                       if "p50 of quiet requests" not in ax.get_legend_handles_labels()[1] else None)
    ax.set_xticks(x, [g[0] for g in groups], fontsize=8)
    ax.set_ylabel("ms (p50)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.45)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.set_title("one request at a time (lower is better)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _decode_bars(ax, m: ModelResult) -> None:
    """The caption's decode step of each system against the floor."""
    caption = m.end_to_end.workloads[m.caption]
    names = ["ours\nin-process", "ours server\n(streamed)"]
    values = [caption.systems["in_process"].decode_step_ms.p50, caption.server_stream.decode_step_ms.p50]
    colors = [color("in_process"), color("server")]
    for b in (s for s in m.systems if s.startswith("transformers")):
        names.append(label(b, m.threads).replace(", ", "\n"))
        values.append(caption.systems[b].decode_step_ms.p50)
        colors.append(color(b))
    bars = ax.bar(names, [v or 0 for v in values], color=colors)
    ax.bar_label(bars, labels=[f"{v:.1f}" if v else "" for v in values], fontsize=8)
    floor = m.floor
    ax.axhline(floor.floor_ms, color="black", linestyle="--", linewidth=1,
               label=f"floor {floor.floor_ms:.2f} ms ({floor.bound_by})")
    ax.set_ylim(0, max([floor.floor_ms, *[v or 0 for v in values]]) * 1.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylabel("ms per decode step (batch 1, p50)")
    ax.set_title(f"decode step vs the floor ({m.caption})", fontsize=10)
    ax.tick_params(axis="x", labelsize=7.5)
    ax.grid(axis="y", alpha=0.3)


if __name__ == "__main__":
    source = Path(sys.argv[1])
    for p in write(json.loads(source.read_text()), source.parent):
        print(p)
