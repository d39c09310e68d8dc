"""The benchmark's results as typed records: run.py builds them, report.py renders them, and
bench.json holds their dicts.

`Record.to_dict()` writes the keys bench.json has always had; `Record.from_dict()` reads a saved
file back, older ones included (a key they lack is a field that defaults to None). A field's
trailing comment documents its key: `python -m blip2_triton.benchmarks.records` prints them all as
the schema tables of benchmarks/README.md (a test keeps the two the same). Times are milliseconds
unless a name says otherwise; "floor" is a lower bound from the measured machine (see README).
"""
from __future__ import annotations

import inspect
import re
import statistics
import types
import typing
from dataclasses import dataclass, field, fields

import numpy as np

from .tables import fmt, label, ratio, table

INT8 = "in_process_int8"  # the int8-weight export, in process (compared with fp32 transformers, not token-exact)
IMAGE_STAGES = ("preprocess", "vision_encoder", "qformer")  # the served image stages (Triton models)
STAGES = ("preprocess", "vision_encoder", "qformer", "prefill", "decode", "engine_overhead", "postprocess")


def optional(default=None):
    """A field whose key is left out when it is None: keys that only some runs write (int8, gaps
    between streamed tokens) or that older results lack."""
    return field(default=default, metadata={"optional": True})


class Record:
    """A dataclass that is one dict of bench.json: each field is the key of its name; records nest."""

    def to_dict(self) -> dict:
        return {f.name: _dump(getattr(self, f.name)) for f in fields(self)
                if not (f.metadata.get("optional") and getattr(self, f.name) is None)}

    @classmethod
    def from_dict(cls, data: dict):
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _load(hints[f.name], data[f.name]) for f in fields(cls) if f.name in data})


def _dump(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


def _load(hint, value):
    """`value` (from JSON) as the type `hint` names: records rebuilt, int dict keys restored."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _load(next(a for a in typing.get_args(hint) if a is not type(None)), value)
    if origin is list:
        return [_load(typing.get_args(hint)[0], v) for v in value]
    if origin is dict:
        key, item = typing.get_args(hint)
        return {_load(key, k): _load(item, v) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value)
    if hint is int and isinstance(value, str):
        return int(value)
    return value


# ---- timings --------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Summary(Record):
    """Timings of a set of requests or steps (ms): their number, mean and percentiles (linear
    interpolation); only n when the set is empty."""

    n: int  # timings behind the numbers
    mean: float | None = optional()  # mean
    p50: float | None = optional()  # median
    p90: float | None = optional()  # 90th percentile
    p99: float | None = optional()  # 99th percentile (of 30: the slowest but one)
    min: float | None = optional()  # fastest
    max: float | None = optional()  # slowest

    @classmethod
    def of(cls, seconds) -> "Summary":
        values = np.asarray([s for s in seconds if s is not None], dtype=np.float64) * 1e3
        if values.size == 0:
            return cls(n=0)
        pct = lambda q: round(float(np.percentile(values, q)), 3)  # noqa: E731
        return cls(n=int(values.size), mean=round(float(values.mean()), 3), p50=pct(50), p90=pct(90), p99=pct(99),
                   min=round(float(values.min()), 3), max=round(float(values.max()), 3))

    @property
    def quiet_p50(self) -> float | None:
        """p50 of a subset (the quiet requests) when at least 3 requests back it."""
        return self.p50 if self.n >= 3 else None


def _mean_step(r: dict) -> float | None:
    """Seconds per decode step of one request: first token to last over the steps between.

    Mean, not median, of the gaps: streamed responses can arrive in bursts (several tokens in one
    read), which makes single gaps meaningless but leaves first-to-last intact.
    """
    if "stages" in r:
        return r["stages"]["decode"] / r["decode_steps"] if r["decode_steps"] else None
    gaps = r.get("inter_token")
    return statistics.mean(gaps) if gaps else None


@dataclass(kw_only=True)
class SystemLatency(Record):
    """One system's single requests of one workload, taken in turns with the other systems'."""

    latency_ms: Summary  # request latency: encoded image in, text out
    latency_ms_quiet: Summary  # the same over the quiet requests (others' cores below settings.quiet_cores)
    others_cores_mean: float  # cores other users' processes kept busy during these requests, on average
    ttft_ms: Summary | None  # time to first token of the same calls; null for the server (see server_stream)
    tokens_per_request: float  # new tokens per request
    tokens_per_s: float  # tokens_per_request / p50 latency
    inter_token_ms: Summary | None = optional()  # gaps between consecutive tokens, where the system reports them
    decode_step_ms: Summary  # per request: decode time / decode steps (first token to last where not timed inside)

    @classmethod
    def of(cls, runs: list[dict], quiet_cores: float, server: bool) -> "SystemLatency":
        """From the timed calls (end_to_end.request or a worker's generate) of one system."""
        latency = Summary.of([r["seconds"] for r in runs])
        tokens = statistics.mean(len(r["tokens"]) for r in runs)
        gaps = [g for r in runs for g in r.get("inter_token", [])]
        return cls(
            latency_ms=latency,
            latency_ms_quiet=Summary.of([r["seconds"] for r in runs if r["others_cores"] < quiet_cores]),
            others_cores_mean=round(statistics.mean(r["others_cores"] for r in runs), 3),
            ttft_ms=None if server else Summary.of([r.get("ttft") for r in runs]),
            tokens_per_request=tokens, tokens_per_s=round(tokens / (latency.p50 / 1e3), 3),
            inter_token_ms=Summary.of(gaps) if gaps else None,
            decode_step_ms=Summary.of([_mean_step(r) for r in runs]))


@dataclass(kw_only=True)
class StreamLatency(Record):
    """Streaming requests through the server: one response per new token."""

    others_cores_mean: float | None  # cores other users' processes kept busy meanwhile, on average
    latency_ms: Summary  # to the final response
    ttft_ms: Summary  # to the first streamed response
    inter_token_ms: Summary  # gaps between streamed responses
    decode_step_ms: Summary  # per request: first response to last / the gaps between
    responses_per_request: float | None  # streamed responses per request

    @classmethod
    def of(cls, runs: list[dict]) -> "StreamLatency":
        return cls(others_cores_mean=round(statistics.mean(r["others_cores"] for r in runs), 3) if runs else None,
                   latency_ms=Summary.of([r["seconds"] for r in runs]), ttft_ms=Summary.of([r["ttft"] for r in runs]),
                   inter_token_ms=Summary.of([g for r in runs for g in r["inter_token"]]),
                   decode_step_ms=Summary.of([_mean_step(r) for r in runs]),
                   responses_per_request=statistics.mean(r["responses"] for r in runs) if runs else None)


@dataclass(kw_only=True)
class Ratios(Record):
    """Ours / one transformers baseline, for one workload (below 1: ours faster). All baselines share
    one dict in bench.json: a field keeps its name for the baseline `transformers` and takes the
    suffix `_vs_<baseline>` for the others (server_latency_p50_vs_transformers_1_thread)."""

    server_latency_p50: float | None  # p50 latency, server / baseline
    in_process_latency_p50: float | None  # p50 latency, in process / baseline
    server_latency_p50_quiet: float | None  # p50 over quiet requests, server / baseline
    in_process_latency_p50_quiet: float | None  # p50 over quiet requests, in process / baseline
    server_latency_min: float | None  # fastest request / fastest request (the least disturbed)
    in_process_latency_min: float | None  # the same, in process
    server_stream_ttft_p50: float | None  # time to first token, streamed through the server / baseline
    in_process_ttft_p50: float | None  # time to first token, in process / baseline
    in_process_int8_latency_p50: float | None = optional()  # int8 weights in process / fp32 baseline
    in_process_int8_latency_p50_quiet: float | None = optional()  # the same over quiet requests


@dataclass(kw_only=True)
class RatiosOverTransformers(Record):
    """Every baseline's Ratios for one workload, flattened into one dict (see Ratios)."""

    by_baseline: dict[str, Ratios]  # baseline system -> its ratios (keys suffixed, see Ratios)
    server_tokens_per_s: float | None  # server tokens/s over transformers' (above 1: ours faster)

    def to_dict(self) -> dict:
        out = {}
        for baseline, r in self.by_baseline.items():
            suffix = "" if baseline == "transformers" else f"_vs_{baseline}"
            out |= {key + suffix: value for key, value in r.to_dict().items()}
        return out | {"server_tokens_per_s": self.server_tokens_per_s}

    @classmethod
    def from_dict(cls, data: dict) -> "RatiosOverTransformers":
        grouped: dict[str, dict] = {}
        for key, value in data.items():
            if key != "server_tokens_per_s":
                name, _, baseline = key.partition("_vs_")
                grouped.setdefault(baseline or "transformers", {})[name] = value
        return cls(by_baseline={b: Ratios.from_dict(v) for b, v in grouped.items()},
                   server_tokens_per_s=data.get("server_tokens_per_s"))


@dataclass(kw_only=True)
class ServerOverhead(Record):
    """What Triton + gRPC + BLS add to a request over the in-process pipeline (ms)."""

    p50_difference: float  # server p50 - in-process p50
    p50_quiet_difference: float | None  # the same over quiet requests
    paired_median: float | None  # median of server - in-process over the requests taken in the same turn
    relative_to_in_process: float | None  # p50_difference / in-process p50


@dataclass(kw_only=True)
class WorkloadLatency(Record):
    """One workload's single requests, every system side by side. In bench.json each system's
    SystemLatency is a key of its own (server, in_process, in_process_int8, transformers,
    transformers_1_thread) beside the other fields."""

    systems: dict[str, SystemLatency]  # system -> its requests (one key per system)
    server_stream: StreamLatency  # streaming requests through the server
    ratios_ours_over_transformers: RatiosOverTransformers  # ours / each baseline
    server_overhead_ms: ServerOverhead  # server over in-process

    def to_dict(self) -> dict:
        return {**_dump(self.systems), **{k: v for k, v in super().to_dict().items() if k != "systems"}}

    @classmethod
    def from_dict(cls, data: dict) -> "WorkloadLatency":
        others = {f.name for f in fields(cls)} - {"systems"}
        return cls(systems={k: SystemLatency.from_dict(v) for k, v in data.items() if k not in others},
                   server_stream=StreamLatency.from_dict(data["server_stream"]),
                   ratios_ours_over_transformers=RatiosOverTransformers.from_dict(data["ratios_ours_over_transformers"]),
                   server_overhead_ms=ServerOverhead.from_dict(data["server_overhead_ms"]))

    @classmethod
    def of(cls, per: dict[str, list[dict]], streams: list[dict], quiet_cores: float) -> "WorkloadLatency":
        """From every system's timed calls of one workload (`per`: system -> calls) and its streams."""
        systems = {s: SystemLatency.of(runs, quiet_cores, server=s == "server") for s, runs in per.items()}
        stream = StreamLatency.of(streams)
        paired = [(a["seconds"] - b["seconds"]) for a, b in zip(per["server"], per["in_process"])]
        server, local = systems["server"], systems["in_process"]
        quiet = (server.latency_ms_quiet.quiet_p50, local.latency_ms_quiet.quiet_p50)
        overhead = ServerOverhead(
            p50_difference=round(server.latency_ms.p50 - local.latency_ms.p50, 3),
            p50_quiet_difference=round(quiet[0] - quiet[1], 3) if all(quiet) else None,
            paired_median=round(statistics.median(paired) * 1e3, 3) if paired else None,
            relative_to_in_process=ratio(server.latency_ms.p50 - local.latency_ms.p50, local.latency_ms.p50))
        ratios = RatiosOverTransformers(
            by_baseline={b: _ratios(systems, stream, b) for b in systems if b.startswith("transformers")},
            server_tokens_per_s=ratio(server.tokens_per_s, systems["transformers"].tokens_per_s))
        return cls(systems=systems, server_stream=stream, ratios_ours_over_transformers=ratios,
                   server_overhead_ms=overhead)


def _ratios(systems: dict[str, SystemLatency], stream: StreamLatency, baseline: str) -> Ratios:
    theirs, server, local = systems[baseline], systems["server"], systems["in_process"]
    int8 = systems.get(INT8)
    return Ratios(
        server_latency_p50=ratio(server.latency_ms.p50, theirs.latency_ms.p50),
        in_process_latency_p50=ratio(local.latency_ms.p50, theirs.latency_ms.p50),
        server_latency_p50_quiet=ratio(server.latency_ms_quiet.quiet_p50, theirs.latency_ms_quiet.quiet_p50),
        in_process_latency_p50_quiet=ratio(local.latency_ms_quiet.quiet_p50, theirs.latency_ms_quiet.quiet_p50),
        server_latency_min=ratio(server.latency_ms.min, theirs.latency_ms.min),
        in_process_latency_min=ratio(local.latency_ms.min, theirs.latency_ms.min),
        server_stream_ttft_p50=ratio(stream.ttft_ms.p50, theirs.ttft_ms.p50),
        in_process_ttft_p50=ratio(local.ttft_ms.p50, theirs.ttft_ms.p50),
        in_process_int8_latency_p50=ratio(int8.latency_ms.p50, theirs.latency_ms.p50) if int8 else None,
        in_process_int8_latency_p50_quiet=(ratio(int8.latency_ms_quiet.quiet_p50, theirs.latency_ms_quiet.quiet_p50)
                                           if int8 else None))


@dataclass(kw_only=True)
class EndToEnd(Record):
    """Single requests per workload ("end_to_end" in bench.json: workload -> WorkloadLatency)."""

    workloads: dict[str, WorkloadLatency]  # workload name -> its requests (the dict itself)

    def to_dict(self) -> dict:
        return _dump(self.workloads)

    @classmethod
    def from_dict(cls, data: dict) -> "EndToEnd":
        return cls(workloads={k: WorkloadLatency.from_dict(v) for k, v in data.items()})

    def latency_table(self, tokens: dict[str, int], threads: int, quiet_cores: float) -> str:
        rows = []
        for name, w in self.workloads.items():
            for system, s in w.systems.items():
                lat, quiet = s.latency_ms, s.latency_ms_quiet
                ttft = w.server_stream.ttft_ms if system == "server" else s.ttft_ms
                rows.append([f"{name} ({tokens[name]} tokens)", label(system, threads), lat.p50, lat.p90, lat.p99,
                             lat.n, ttft.p50, ttft.n, s.tokens_per_s, s.others_cores_mean, f"{quiet.n}/{lat.n}",
                             quiet.p50])
        return (table(["workload", "system", "p50", "p90", "p99", "n", "TTFT p50", "TTFT n", "tokens/s",
                       "others' cores", "quiet", "quiet p50"], rows)
                + "\nn: requests behind the percentiles (p99 of n requests is their slowest but (n - 1) / 100). "
                "TTFT of the server: streaming requests (time to the first streamed response); of the others: time "
                "to the first token of the same calls. tokens/s = tokens per request / p50 latency. others' cores: "
                "how many cores other users' processes kept busy during this system's requests, on average; quiet: "
                f"requests during which they kept fewer than {quiet_cores} busy, and their p50.\n")

    def ratio_table(self, threads: int) -> str:
        int8 = any(INT8 in w.systems for w in self.workloads.values())
        rows = []
        for name, w in self.workloads.items():
            for baseline, r in w.ratios_ours_over_transformers.by_baseline.items():
                rows.append([name, label(baseline, threads), r.server_latency_p50, r.in_process_latency_p50,
                             r.server_latency_p50_quiet, r.in_process_latency_p50_quiet, r.server_latency_min,
                             r.server_stream_ttft_p50, r.in_process_ttft_p50,
                             *([r.in_process_int8_latency_p50, r.in_process_int8_latency_p50_quiet] if int8 else [])])
        return (table(["workload", "versus", "server latency p50", "in-process latency p50", "server p50 quiet",
                       "in-process p50 quiet", "server min / min", "server TTFT p50", "in-process TTFT p50",
                       *(["int8 in-process p50", "int8 in-process p50 quiet"] if int8 else [])], rows)
                + "\nquiet: p50 over the requests during which other users' processes kept few cores busy (needs 3 "
                "per system); min / min: each system's fastest request.\n")

    def overhead_table(self) -> str:
        return (table(["workload", "p50 server − p50 in-process", "same, quiet requests", "median paired difference",
                       "relative"],
                      [[name, o.p50_difference, o.p50_quiet_difference, o.paired_median, o.relative_to_in_process]
                       for name, o in ((n, w.server_overhead_ms) for n, w in self.workloads.items())])
                + "\nUnder load from other users the server can come out ahead: its models run in several processes "
                "with more runnable threads than one in-process worker, so the kernel's per-thread fairness gives "
                "it a larger share of the contended cores. The quiet column is the one to read.\n")


# ---- token identity ---------------------------------------------------------------------------------

@dataclass(kw_only=True)
class TokenIdentity(Record):
    """Do our systems generate exactly transformers' token ids for the same request?"""

    all: bool  # every compared request generated transformers' ids
    compared: int  # requests compared: server (one-shot and streamed), in process, transformers at other thread counts
    mismatches: list[dict]  # each differing request: workload, system, image, ours, transformers
    distinct_tokens_in_reference: int  # distinct ids in transformers' outputs (1 would make the check weak)

    def markdown(self) -> str:
        return (f"**Tokens identical to transformers:** {'yes' if self.all else 'NO'} ({self.compared} requests "
                f"compared, {len(self.mismatches)} mismatches; {self.distinct_tokens_in_reference} distinct token ids "
                "in the reference outputs).\n")


@dataclass(kw_only=True)
class Int8Agreement(Record):
    """How close int8 weights stay to fp32 transformers (random weights: not meant to be token-exact)."""

    compared: int  # int8 requests compared
    identical: int  # of them, generating transformers' fp32 ids
    mean_agreeing_prefix: float | None  # share of a request's tokens before the first difference, mean

    def markdown(self) -> str:
        return (f"**int8 weights vs fp32 transformers:** {self.identical} of {self.compared} requests generate the "
                f"same tokens; on average {100 * (self.mean_agreeing_prefix or 0):.0f}% of a request's tokens agree "
                "before the first difference (int8 is not meant to be token-exact; accuracy on the trained model "
                "is in its model card).\n")


# ---- stages -----------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class StageMedians(Record):
    """One workload's in-process requests, stage by stage (medians over its requests, ms)."""

    preprocess_ms: float  # image bytes + prompt -> pixel values + prompt ids
    vision_encoder_ms: float  # vision encoder graph
    qformer_ms: float  # Q-Former graph
    prefill_ms: float  # the language model's prefill: every LM graph run before the first token
    decode_ms: float  # every decode step of the request
    engine_overhead_ms: float  # generation engine time outside the LM's calls (search, cache bookkeeping)
    postprocess_ms: float  # detokenizing the whole text
    total_ms: float  # the request
    decode_step_median_ms: float | None = optional()  # one decode step, median within a request
    postprocess_streamed_ms: float  # detokenizing piece by piece, as a streaming request does
    tokens: int  # new tokens per request
    decode_steps: int  # decode steps per request (after the prefill's first token)

    def row(self, workload: str) -> list:
        return [workload, *[getattr(self, f"{k}_ms") for k in STAGES], self.total_ms]


@dataclass(kw_only=True)
class ModelStats(Record):
    """One served Triton model over a set of requests (its statistics' differences; ms per request)."""

    requests: int  # successful requests
    executions: int  # model executions (batches)
    mean_batch: float | None  # requests per execution
    queue_ms: float  # waiting in the dynamic batcher's queue
    compute_input_ms: float  # copying inputs in
    compute_infer_ms: float  # running the model (a batch's time counts for each of its requests)
    compute_output_ms: float  # copying outputs out
    request_ms: float  # the whole request inside Triton


@dataclass(kw_only=True)
class EngineMetrics(Record):
    """The `blip2` model's engine over a set of requests (its blip2_* metrics' differences)."""

    generated_tokens: int | None  # tokens generated
    decode_steps: int | None  # batched decode steps
    prefills: int | None  # prefills (one per request)
    engine_ttft_ms: float | None  # execute() receiving a request to its first token (image stages, queue, prefill), mean
    prefill_ms: float | None  # one prefill, mean
    decode_step_ms: float | None  # one decode step, mean
    detokenize_ms: float | None  # one detokenization, mean
    detokenize_per_request: float | None  # detokenizations per request


@dataclass(kw_only=True)
class ServerStages(Record):
    """The server's side of a set of requests: Triton's statistics and the engine's metrics."""

    models: dict[str, ModelStats]  # served model -> its statistics (blip2's compute is only the hand-off)
    generator_metrics: EngineMetrics  # the blip2 engine's stages


@dataclass(kw_only=True)
class RowStep(Record):
    """One batched decoder call at a number of rows (median over rounds)."""

    rows: int  # sequences in the call
    step_ms: float  # the call
    ms_per_token: float  # step_ms / rows


@dataclass(kw_only=True)
class DecodeRound(Record):
    """One round of decoder calls, one per row count, right after a bandwidth probe."""

    read_gbps: float  # the probe's memory read bandwidth (GB/s)
    step_ms: dict[int, float]  # rows -> the call's ms


@dataclass(kw_only=True)
class DecodeVsRows(Record):
    """Decoder calls alone at 1, 2, 4, ... rows, in process, each row `past_length` positions deep. In
    bench.json its keys sit in "stages": decode_step_vs_rows (fp32) and decode_step_vs_rows_int8
    (lists of RowStep), decode_step_rounds, decode_step_past_length."""

    by_system: dict[str, list[RowStep]]  # in_process / in_process_int8 -> its steps (decode_step_vs_rows[_int8])
    decode_step_rounds: dict[str, list[DecodeRound]]  # system -> its rounds
    decode_step_past_length: int  # self-attention positions cached before the step (mid-caption)

    @staticmethod
    def key(system: str) -> str:
        return "decode_step_vs_rows" + ("_int8" if system == INT8 else "")

    def to_dict(self) -> dict:
        return {**{self.key(s): _dump(v) for s, v in self.by_system.items()},
                "decode_step_rounds": _dump(self.decode_step_rounds),
                "decode_step_past_length": self.decode_step_past_length}

    @classmethod
    def from_dict(cls, data: dict) -> "DecodeVsRows":
        return cls(by_system={s: [RowStep.from_dict(d) for d in data[cls.key(s)]]
                              for s in ("in_process", INT8) if cls.key(s) in data},
                   decode_step_rounds=_load(dict[str, list[DecodeRound]], data["decode_step_rounds"]),
                   decode_step_past_length=data["decode_step_past_length"])

    def table(self) -> str:
        header, columns = ["rows"], []
        for system, steps in self.by_system.items():
            prefix = "int8 " if system == INT8 else ""
            one = next((d.ms_per_token for d in steps if d.rows == 1), None)
            header += [f"{prefix}step", f"{prefix}per token", f"{prefix}tokens/s vs 1 row"]
            columns.append([[d.step_ms, d.ms_per_token, one / d.ms_per_token if one else None] for d in steps])
        first = next(iter(self.by_system.values()))
        return table(header, [[d.rows, *[c for col in columns for c in col[i]]] for i, d in enumerate(first)])


@dataclass(kw_only=True)
class Stages(Record):
    """Where the time goes: in process, on the server, and decoder calls alone ("stages" in bench.json;
    DecodeVsRows' keys sit beside in_process and server)."""

    in_process: dict[str, StageMedians]  # workload -> stage medians of its in-process requests
    server: dict[str, ServerStages]  # workload -> the server's stages over its single requests
    decode: DecodeVsRows  # decode step vs rows (its keys in this dict)

    def to_dict(self) -> dict:
        return {"in_process": _dump(self.in_process), "server": _dump(self.server), **self.decode.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "Stages":
        return cls(in_process=_load(dict[str, StageMedians], data["in_process"]),
                   server=_load(dict[str, ServerStages], data["server"]), decode=DecodeVsRows.from_dict(data))

    def in_process_table(self) -> str:
        return table(["workload", *STAGES, "total"], [m.row(w) for w, m in self.in_process.items()])

    def server_tables(self) -> str:
        models = table(["workload", "model", "requests", "mean batch", "queue", "compute input", "compute infer",
                        "compute output"],
                       [[w, k + (" (public model: execute() only enqueues)" if k == "blip2" else ""), v.requests,
                         v.mean_batch, v.queue_ms, v.compute_input_ms, v.compute_infer_ms, v.compute_output_ms]
                        for w, s in self.server.items() for k, v in s.models.items()])
        engine = table(["workload", "time to first token", "prefill", "decode step (mean)", "decode steps",
                        "detokenize (mean)", "detokenizations / request", "tokens"],
                       [[w, g.engine_ttft_ms, g.prefill_ms, g.decode_step_ms, g.decode_steps, g.detokenize_ms,
                         g.detokenize_per_request, g.generated_tokens]
                        for w, g in ((w, s.generator_metrics) for w, s in self.server.items())])
        return ("Triton's statistics of each model, read before and after every request of the workload:\n\n" + models
                + "\nThe `blip2` model's engine, from its metrics (blip2_*_seconds_sum / _count) over the same "
                "requests:\n\n" + engine)


# ---- costs and floors -------------------------------------------------------------------------------

@dataclass(kw_only=True)
class WeightBytes(Record):
    """A decoder graph's weights (initializers)."""

    weight_bytes: int  # all of them
    bytes_read_per_step: int  # what one run reads: all but lookup tables read by Gather alone
    matmul_params: int  # fp32 rank-2 weights feeding MatMul/Gemm (int8 graphs: 0)


@dataclass(kw_only=True)
class GraphCost(Record):
    """What one stage's graph runs compute and read at one request's shapes (batch 1), counted on the
    exported ONNX graphs (flops.py). A stage of several runs (an encoder-decoder LM's prefill) is
    their sum, each run under `parts`."""

    flops: int  # MatMul, Gemm, Conv and fused attention (2 per multiply-add)
    flops_by_op: dict[str, int]  # the same by op type
    weight_bytes_read: int  # weights read once (lookup tables read by Gather alone left out)
    input_bytes_read: dict[str, int] | None = optional()  # cached keys/values read, by the axis they span (max_sequence_length: self-attention, encoder_sequence_length: cross-attention)
    dims: dict[str, int] | None = optional()  # the named dimensions the graph was costed at
    shapes: dict[str, list[int]] = field(default_factory=dict)  # the graph's input shapes (one-run stages)
    parts: dict[str, GraphCost] | None = optional()  # graph name -> its run's cost (stages of several runs)

    @property
    def bytes_read(self) -> int:
        return self.weight_bytes_read + sum((self.input_bytes_read or {}).values())

    @classmethod
    def total(cls, parts: dict[str, "GraphCost"]) -> "GraphCost":
        """The cost of running `parts` one after the other."""
        by_op: dict[str, int] = {}
        inputs: dict[str, int] = {}
        for p in parts.values():
            for k, v in p.flops_by_op.items():
                by_op[k] = by_op.get(k, 0) + v
            for k, v in (p.input_bytes_read or {}).items():
                inputs[k] = inputs.get(k, 0) + v
        return cls(flops=sum(p.flops for p in parts.values()), flops_by_op=by_op,
                   weight_bytes_read=sum(p.weight_bytes_read for p in parts.values()), input_bytes_read=inputs,
                   parts=parts)


@dataclass(kw_only=True)
class Floor(Record):
    """The lower bound of one batch-1 decode step: its bytes at the best measured read bandwidth, its
    FLOPs at the best measured matmul rate, the larger of the two."""

    bandwidth_floor_ms: float  # bytes read / read bandwidth
    compute_floor_ms: float  # FLOPs / matmul rate
    floor_ms: float  # the larger
    bound_by: str  # "memory bandwidth" or "compute"
    bytes_read: int | None = optional()  # weights + cached keys/values the step reads (older results: weights only)


@dataclass(kw_only=True)
class SideBySide(Record):
    """The 1-row decode step over the bandwidth floor of its own round (each round follows a probe)."""

    rounds: int  # rounds
    ratio_median: float  # step / its round's floor, median over rounds
    ratio_min: float  # lowest
    ratio_max: float  # highest
    step_ms_median: float  # the step, median
    read_gbps_min: float  # the probes' bandwidth, lowest (GB/s)
    read_gbps_max: float  # highest


@dataclass(kw_only=True)
class StageFloor(Record):
    """One stage (vision encoder, Q-Former, prefill) against the floor of its graph runs."""

    gflops: float  # its FLOPs (GraphCost)
    compute_floor_ms: float  # FLOPs / best matmul rate
    bytes_floor_ms: float  # bytes read / best read bandwidth
    floor_ms: float  # the larger
    bound_by: str  # "compute" or "memory bandwidth"
    in_process_ms: float | None  # measured in process (median)
    server_ms: float | None  # measured on the server (Triton's compute time; the engine's prefill metric), mean
    in_process_over_floor: float | None  # in_process_ms / floor_ms
    server_over_floor: float | None  # server_ms / floor_ms


@dataclass(kw_only=True)
class StageFloors(Record):
    """Each stage against its floor ("stage_floors" in bench.json: workload -> stage -> StageFloor)."""

    workloads: dict[str, dict[str, StageFloor]]  # workload -> stage -> its floor (the dict itself)

    def to_dict(self) -> dict:
        return _dump(self.workloads)

    @classmethod
    def from_dict(cls, data: dict) -> "StageFloors":
        return cls(workloads=_load(dict[str, dict[str, StageFloor]], data))

    def table(self) -> str:
        return table(["workload", "stage", "MFLOP", "compute floor", "bytes floor", "floor", "bound by", "in-process",
                      "× floor", "server", "× floor"],
                     [[w, stage, f.gflops * 1e3, f.compute_floor_ms, f.bytes_floor_ms, f.floor_ms, f.bound_by,
                       f.in_process_ms, f.in_process_over_floor, f.server_ms, f.server_over_floor]
                      for w, by_stage in self.workloads.items() for stage, f in by_stage.items()])


# ---- throughput -------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class BatchStats(Record):
    """How one image-stage model batched at one concurrency level (ms per request)."""

    mean_batch: float | None  # requests per execution
    queue_ms: float  # in the dynamic batcher's queue
    compute_infer_ms: float  # running the model


@dataclass(kw_only=True)
class Batching(Record):
    """How the server batched at one concurrency level."""

    decode_rows_per_step: float | None  # sequences per batched decode step (the continuous batcher), mean
    models: dict[str, BatchStats]  # image-stage model -> its batching


@dataclass(kw_only=True)
class ThroughputLevel(Record):
    """N client streams in a closed loop (each sends its next caption when its previous answer arrives)."""

    streams: int  # concurrent client streams
    requests: int  # requests served
    seconds: float  # wall time
    requests_per_s: float  # requests / seconds
    tokens_per_s: float  # new tokens / seconds
    tokens: int  # new tokens
    others_cores: float  # cores other users' processes kept busy meanwhile
    our_cores: float  # cores the server, the clients and the benchmark kept busy
    server: Batching  # how the server batched
    latency_ms: Summary  # request latency under this load

    def row(self) -> list:
        models = self.server.models

        def busy(k: str) -> float | None:
            """Share of the level one instance of model k spent computing: executions/s x compute per execution."""
            v = models.get(k)
            return self.requests_per_s / v.mean_batch * v.compute_infer_ms / 1e3 if v and v.mean_batch else None

        vision = models.get("vision_encoder")
        return [self.streams, self.requests, self.requests_per_s, self.tokens_per_s, self.latency_ms.p50,
                self.latency_ms.p90, vision.mean_batch if vision else None, busy("preprocess"),
                self.server.decode_rows_per_step, self.our_cores,
                self.our_cores / self.requests_per_s * 1e3 if self.our_cores else None, self.others_cores]


@dataclass(kw_only=True)
class ThroughputBound(Record):
    """Requests/s the machine could serve if no core ever idled: 1 / the CPU time one request costs
    (every in-process stage uses all cores, so its median is the whole machine's time)."""

    rows: int  # decode rows per step assumed (the measured row count closest below `streams`)
    once_ms: float  # preprocess + vision encoder + Q-Former + prefill, once per request
    decode_ms_per_token: float  # decode time per token at `rows` rows
    request_cost_ms: float  # once_ms + tokens x decode_ms_per_token
    bound_requests_per_s: float  # 1000 / request_cost_ms
    streams: int  # the concurrency compared with the bound
    measured_requests_per_s: float | None  # what that many streams reached
    measured_over_bound: float | None  # measured / bound

    def markdown(self, tokens: int) -> str:
        return (f"Bound from the per-request CPU cost: {self.once_ms:.0f} ms of preprocess + vision + Q-Former + "
                f"prefill (in-process medians, each using every core) + {tokens} tokens × {self.decode_ms_per_token} ms "
                f"(decode per token at {self.rows} rows) = {self.request_cost_ms:.0f} ms → "
                f"{self.bound_requests_per_s:.2f} requests/s. Measured with {self.streams} streams: "
                f"{fmt(self.measured_requests_per_s)} requests/s = **{fmt(self.measured_over_bound)} × the bound**.\n")


@dataclass(kw_only=True)
class BaselineBatch(Record):
    """transformers' static batching: one generate() over N images."""

    batch: int  # images in the one generate() call
    seconds: float  # the call
    tokens: int  # new tokens over the batch
    requests_per_s: float  # batch / seconds
    tokens_per_s: float  # tokens / seconds
    others_cores: float  # cores other users' processes kept busy meanwhile


# ---- memory and perf_analyzer -----------------------------------------------------------------------

@dataclass(kw_only=True)
class ProcessMemoryRecord(Record):
    """One server process at one moment (server.memory.ProcessMemory in MiB)."""

    rss_mib: float  # resident set size: shared pages counted in full
    pss_mib: float  # proportional set size: each shared page split between the processes mapping it
    uss_mib: float  # unique set size: what ending this process would free
    anonymous_mib: float  # resident anonymous memory (weights read into memory, arenas, prepacked copies, Python)
    file_mib: float  # resident file-backed pages (libraries, memory-mapped weights)
    torch: bool  # whether the process maps libtorch
    mappings_mib: dict[str, float]  # PSS of its largest mappings by file ([anon]: anonymous memory)

    @classmethod
    def of(cls, m) -> "ProcessMemoryRecord":
        mib = lambda b: round(b / 2**20, 1)  # noqa: E731
        return cls(rss_mib=mib(m.rss), pss_mib=mib(m.pss), uss_mib=mib(m.uss), anonymous_mib=mib(m.anonymous),
                   file_mib=mib(m.file), torch=m.torch, mappings_mib={k: mib(v) for k, v in m.mappings.items()})


@dataclass(kw_only=True)
class Memory(Record):
    """Peak memory of the server and of each worker. In bench.json a worker's peak is the key
    `<worker>_peak_rss_mib` (in_process_peak_rss_mib, transformers_peak_rss_mib, ...)."""

    server_peak_rss_mib: float  # the server's process group, summed (sampled every 0.25 s)
    server_peak_rss_by_process_mib: dict[str, float]  # each process's own peak
    server_pss_at_end_mib: float | None  # proportional set size at the end (shared pages split)
    server_pss_by_process_mib: dict[str, float]  # per process
    server_samples: int  # samples taken
    workers_peak_rss_mib: dict[str, float]  # worker -> its peak RSS (VmHWM; one key per worker, see above)
    note: str  # how these were measured
    server_processes: dict[str, ProcessMemoryRecord] | None = optional()  # process -> RSS, PSS, USS and largest mappings at the end

    def to_dict(self) -> dict:
        out = {k: v for k, v in super().to_dict().items() if k not in ("workers_peak_rss_mib", "note")}
        return out | {f"{k}_peak_rss_mib": v for k, v in self.workers_peak_rss_mib.items()} | {"note": self.note}

    @classmethod
    def from_dict(cls, data: dict) -> "Memory":
        workers = {k[: -len("_peak_rss_mib")]: v for k, v in data.items()
                   if k.endswith("_peak_rss_mib") and not k.startswith("server")}
        known = {k: v for k, v in data.items() if not (k.endswith("_peak_rss_mib") and not k.startswith("server"))}
        return super().from_dict(known | {"workers_peak_rss_mib": workers})

    def markdown(self, threads: int) -> str:
        return (table(["server peak RSS (sum over process group)", "server PSS at end",
                       *[f"{label(k, threads)} peak RSS" for k in self.workers_peak_rss_mib]],
                      [[self.server_peak_rss_mib, self.server_pss_at_end_mib, *self.workers_peak_rss_mib.values()]])
                + "\nServer peak RSS by process: "
                + ", ".join(f"{k} {v}" for k, v in self.server_peak_rss_by_process_mib.items()) + ".\n"
                + ("" if not self.server_processes else "\nServer processes at the end (MiB):\n\n" + table(
                    ["process", "RSS", "PSS", "USS", "anonymous", "maps libtorch"],
                    [[k, m.rss_mib, m.pss_mib, m.uss_mib, m.anonymous_mib, "yes" if m.torch else "no"]
                     for k, m in self.server_processes.items()])))


@dataclass(kw_only=True)
class ServerMemory(Record):
    """The server's processes idle after load and after requests, against the weights it serves
    (`python -m blip2_triton.benchmarks.server_memory`)."""

    weights_mib: float  # bytes of the served graphs (.onnx and external data)
    requests: int  # captions sent between the two measurements
    idle: dict[str, ProcessMemoryRecord]  # process -> memory once every model is loaded
    after_requests: dict[str, ProcessMemoryRecord]  # process -> memory after the requests

    @property
    def target_mib(self) -> float:
        """Issue 15's bound: 1.15x the weight bytes plus 0.6 GiB."""
        return round(1.15 * self.weights_mib + 0.6 * 1024, 1)

    def table(self) -> str:
        names = sorted(set(self.idle) | set(self.after_requests))
        rows = []
        for name in names:
            a, b = self.idle.get(name), self.after_requests.get(name)
            rows.append([name, a and a.rss_mib, a and a.pss_mib, a and a.anonymous_mib, b and b.rss_mib,
                         b and b.pss_mib, b and b.anonymous_mib, "yes" if (a or b).torch else "no"])
        total = lambda phase, key: round(sum(getattr(m, key) for m in phase.values()), 1)  # noqa: E731
        rows.append(["**total**", total(self.idle, "rss_mib"), total(self.idle, "pss_mib"),
                     total(self.idle, "anonymous_mib"), total(self.after_requests, "rss_mib"),
                     total(self.after_requests, "pss_mib"), total(self.after_requests, "anonymous_mib"), ""])
        pss = total(self.after_requests, "pss_mib")
        return (table(["process", "idle RSS", "idle PSS", "idle anon", f"after {self.requests} RSS",
                       f"after {self.requests} PSS", f"after {self.requests} anon", "torch"], rows)
                + f"\nWeights served: {self.weights_mib} MiB. Server PSS after requests {pss} MiB = "
                  f"{pss / self.weights_mib:.2f}x weights; target (1.15x + 0.6 GiB) {self.target_mib} MiB: "
                  f"{'met' if pss <= self.target_mib else 'missed'}.\n"
                + "Largest mappings after requests (PSS MiB): "
                + "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in m.mappings_mib.items())
                            for n, m in self.after_requests.items()) + "\n")


@dataclass(kw_only=True)
class PerfRow(Record):
    """One concurrency level of perf_analyzer's CSV."""

    concurrency: int  # concurrent requests
    requests_per_s: float  # inferences/s
    tokens_per_s: float  # requests/s x the workload's tokens
    p50_ms: float  # latency (the first response's: the only one, requests do not stream)
    p90_ms: float  # latency
    p99_ms: float  # latency
    server_queue_ms: float  # Triton's queue time of `blip2`
    server_compute_infer_ms: float  # Triton's compute time of `blip2` (its execute() only hands off)


@dataclass(kw_only=True)
class PerfAnalyzer(Record):
    """The perf_analyzer cross-check (or why it did not run)."""

    skipped: str | None = optional()  # why it was not run
    model: str | None = optional()  # the Triton model it drove (blip2 or blip2_ensemble)
    workload: str | None = optional()  # the workload it sent
    command: list[str] | None = optional()  # its command line
    seconds: float | None = optional()  # its run time
    returncode: int | None = optional()  # its exit status
    stdout_tail: str | None = optional()  # the end of its output
    stderr_tail: str | None = optional()  # the end of its errors
    ok: bool | None = optional()  # it ran and wrote its CSV
    error: str | None = optional()  # what failed
    rows: list[PerfRow] | None = optional()  # its CSV rows

    def markdown(self) -> str:
        if not self.ok:
            return f"Not available: {self.skipped or self.error}\n"
        return (table(["concurrency", "requests/s", "tokens/s", "p50", "p90", "p99"],
                      [[r.concurrency, r.requests_per_s, r.tokens_per_s, r.p50_ms, r.p90_ms, r.p99_ms]
                       for r in self.rows])
                + f"\n`{' '.join(self.command)}`\n")


# ---- one model, one run -----------------------------------------------------------------------------

@dataclass(kw_only=True)
class ModelResult(Record):
    """Everything measured on one model ("models" -> name in bench.json)."""

    model: dict  # the checkpoint, its exported repositories, export time and the export gate's max |diff|
    workloads: list[dict]  # name, prompt, max_new_tokens of each workload
    decoder_weights: WeightBytes  # the decoder graph's weights
    decoder_weights_int8: WeightBytes | None = optional()  # the int8 export's decoder
    graph_costs: dict[str, GraphCost]  # vision_encoder, qformer, prefill:<workload>, decode_step[:int8] -> cost
    startup_seconds: dict[str, float]  # tritonserver's start, each worker's load
    baseline_info: dict  # transformers: attention implementation, dtype, threads, parameters
    server_threads_env: dict[str, str | None] | None = optional()  # served model -> the thread variable its process got
    systems: list[str]  # the systems measured in turns
    throughput_bound: ThroughputBound  # the bound from per-request CPU cost
    raw: dict  # every timed request: workload -> system -> [{started_s, image, seconds, ttft_s, tokens, ...}]
    end_to_end: EndToEnd  # single requests per workload
    tokens_identical: TokenIdentity  # ours vs transformers, token for token
    int8_agreement: Int8Agreement | None = optional()  # int8 vs fp32 transformers
    stages: Stages  # where the time goes
    throughput: list[ThroughputLevel]  # closed-loop client streams
    baseline_batches: list[BaselineBatch]  # transformers' static batches
    perf_analyzer: PerfAnalyzer  # the cross-check
    memory: Memory  # peak memory
    seconds: float  # this model's part of the run
    floor: Floor | None = None  # the decode step's floor (after the end-of-run machine measurement)
    floor_int8: Floor | None = optional()  # the int8 decode step's floor
    stage_floors: StageFloors | None = None  # each stage against its floor
    floor_side_by_side: dict[str, SideBySide] | None = None  # system -> its step over each round's floor

    @property
    def caption(self) -> str:
        return self.workloads[0]["name"]

    def tokens(self, workload: str | None = None) -> int:
        return next(w["max_new_tokens"] for w in self.workloads if w["name"] == (workload or self.caption))

    @property
    def threads(self) -> int:
        return self.baseline_info["torch_threads"]


@dataclass(kw_only=True)
class BenchResults(Record):
    """bench.json: one run of `blip2-triton bench`."""

    about: str  # what the file is
    command: str | None  # the command line
    facts: dict  # date, commit (and uncommitted files), machine, threads, package versions, load averages
    settings: dict  # benchmarks.run.Settings: repetitions, token counts, concurrency levels, ...
    models: dict[str, ModelResult]  # model name -> its results
    capabilities: dict  # memory read bandwidth and matmul rates: best of start and end, and each (machine.Capabilities)
    run_seconds: float | None = None  # the whole run


# ---- the schema, from the records -------------------------------------------------------------------

_FIELD = re.compile(r"^    (\w+): (.+?)(?: = .*?)?  # (.*)$")


def field_docs(cls: type) -> list[tuple[str, str, str]]:
    """(key, type, meaning) of each field of a record, from its source's trailing comments."""
    out = []
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD.match(line)
        if m:
            out.append(m.groups())
    return out


def records(root: type | None = None, seen: list[type] | None = None) -> list[type]:
    """Every record type reachable from `root` (BenchResults: the file), depth first in field order:
    a section's records follow it."""
    root, seen = root or BenchResults, seen if seen is not None else []
    seen.append(root)
    hints = typing.get_type_hints(root)
    for f in fields(root):
        for cls in _record_types(hints[f.name]):
            if cls not in seen:
                records(cls, seen)
    return seen


def _record_types(hint) -> list[type]:
    if isinstance(hint, type) and issubclass(hint, Record):
        return [hint]
    return [cls for arg in typing.get_args(hint) for cls in _record_types(arg)]


def schema_markdown() -> str:
    """The schema tables of bench.json, one per record (README: "bench.json")."""
    out = []
    for cls in records():
        doc = " ".join(inspect.getdoc(cls).split())
        out.append(f"**`{cls.__name__}`**: {doc}\n")
        out.append(table(["key", "type", "meaning"],
                         [[f"`{k}`", "`" + t.replace("|", "\\|") + "`", m] for k, t, m in field_docs(cls)]))
    return "\n".join(out)


if __name__ == "__main__":
    print(schema_markdown(), end="")
