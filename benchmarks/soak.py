"""`blip2-triton soak`: many clients against one real server for a long time, watching its memory.

N clients each send requests back to back, drawn (seeded) from a mix: good captions (streamed or
not), beam search, bad requests (corrupt image, out-of-range control, a prompt too long for the
context) and requests cancelled mid-stream. Every `--sample-every` seconds the RSS and PSS of each
of the server's processes and the engine's active sequences are sampled.

Writes `<name>.json` (every request and sample, raw), `<name>.md` (the tables) and `<name>.png`
(RSS per process and latency over time), and exits 1 unless it passes: no good request failed,
every bad one was refused with INVALID_ARGUMENT, nothing else failed, no sequence is left active,
and the server's total RSS grew over the second half of the run by less than `--max-slope`
percent per hour (a least-squares slope, so a spike does not decide it). The growth after the
warm-up (`--warmup-seconds`) is reported beside it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .tables import fmt, table

KINDS = {"good": 0.45, "stream": 0.15, "beam": 0.1, "bad": 0.15, "cancelled": 0.15}  # share of requests
DEFAULT_MAX_SLOPE = 2.0  # % of the second half's mean RSS per hour
WINDOWS = 10  # latency percentiles over time: the run cut into this many windows


@dataclass
class Outcome:
    client: int
    kind: str
    start: float  # seconds since the run started
    seconds: float
    result: str  # "ok", or "failed: <error type>: <message>"
    tokens: int = 0
    streams: int = 0  # gRPC streams the call opened (0: it reused an idle one)


@dataclass
class Sample:
    t: float
    rss_mib: dict[str, float]  # process label -> RSS
    pss_mib: dict[str, float]
    active_sequences: float
    requests_done: int
    streams_opened: int  # by all clients so far
    kv_cache_mib: float = 0.0  # the engine's KV cache allocated now (it keeps its largest while busy)


@dataclass
class Settings:
    seconds: float
    clients: int
    seed: int = 0
    sample_every: float = 5.0
    warmup_seconds: float = 120.0
    max_slope: float = DEFAULT_MAX_SLOPE
    max_new_tokens: int = 16
    env: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, float] = field(default_factory=lambda: dict(KINDS))


def _bad_request(rng: random.Random, image: bytes, room: int) -> tuple[bytes, str, dict]:
    """A request the server must refuse with INVALID_ARGUMENT."""
    choice = rng.randrange(4)
    if choice == 0:
        return image[: len(image) // 3], "", {}  # a truncated image
    if choice == 1:
        return b"not an image at all", "", {}
    if choice == 2:
        return image, "", {"temperature": -1.0, "do_sample": True}
    return image, "", {"max_new_tokens": room + 1}  # does not fit the context


async def _client(index: int, url: str, settings: Settings, images: list[bytes], room: int, started: float,
                  deadline: float, outcomes: list[Outcome]) -> None:
    from blip2_triton.client import AsyncBlip2Client, Blip2Error, InvalidArgumentError

    rng = random.Random(settings.seed * 1000 + index)
    kinds, weights = list(settings.kinds), list(settings.kinds.values())
    async with AsyncBlip2Client(url, timeout=120) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            image = rng.choice(images)
            max_new = rng.randint(2, settings.max_new_tokens)
            begun, streams = time.monotonic(), client.streams_opened
            result, tokens = "ok", 0
            try:
                if kind == "good":
                    tokens = len((await client.caption(image, max_new_tokens=max_new)).token_ids)
                elif kind == "stream":
                    tokens = len([p async for p in client.stream(image, max_new_tokens=max_new)])
                elif kind == "beam":
                    tokens = len((await client.caption(image, max_new_tokens=max_new, num_beams=3)).token_ids)
                elif kind == "bad":
                    image, prompt, controls = _bad_request(rng, image, room)
                    try:
                        await client.generate(image, prompt, **controls)
                        result = "failed: answered"
                    except InvalidArgumentError:
                        pass
                else:  # cancelled: stop reading after the first piece (closing the iterator stops it)
                    async for _ in client.stream(image, max_new_tokens=settings.max_new_tokens,
                                                 min_new_tokens=settings.max_new_tokens):
                        tokens += 1
                        if tokens >= rng.randint(1, 3):
                            break
            except Blip2Error as e:
                result = f"failed: {type(e).__name__}: {' '.join(e.message.split())[:200]}"
            outcomes.append(Outcome(index, kind, round(begun - started, 3), round(time.monotonic() - begun, 4),
                                    result, tokens, client.streams_opened - streams))


class _Sampler:
    """RSS/PSS of every server process and the active-sequences gauge, every `interval` s."""

    def __init__(self, server, interval: float, started: float, outcomes: list):
        from .end_to_end import GroupMemorySampler

        self.server, self.interval, self.started, self.outcomes = server, interval, started, outcomes
        self.memory = GroupMemorySampler(server.pgid)
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def sample(self) -> Sample:
        mib = lambda sizes: {k: round(v / 2**20, 2) for k, v in sorted(sizes.items())}  # noqa: E731
        return Sample(round(time.monotonic() - self.started, 2), mib(self.memory.sample()), mib(self.memory.pss()),
                      _gauge(self.server, "blip2_active_sequences"), len(self.outcomes),
                      sum(o.streams for o in list(self.outcomes)),
                      round(_gauge(self.server, "blip2_kv_cache_bytes") / 2**20, 2))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> "_Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _gauge(server, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        lines = r.read().decode().splitlines()
    values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((name + "{", name + " "))]
    return sum(values) if values else float("nan")


def run(repository: Path, settings: Settings) -> dict:
    """Start a server on `repository`, soak it, stop it; -> the raw report (see `summarize`)."""
    from blip2_triton.client import Blip2Client
    from blip2_triton.server import TritonServer

    from .workloads import images as make_images

    images = make_images(6)
    room = _room(repository)
    with TritonServer(repository, grpc_port=None, http_port=None, metrics_port=None, env=settings.env) as server:
        with Blip2Client(server.grpc_url, timeout=120) as client:  # loads every stage once before sampling
            client.caption(images[0], max_new_tokens=2)
        outcomes: list[Outcome] = []
        started = time.monotonic()
        deadline = started + settings.seconds

        async def clients():
            await asyncio.gather(*(_client(i, server.grpc_url, settings, images, room, started, deadline, outcomes)
                                   for i in range(settings.clients)))

        with _Sampler(server, settings.sample_every, started, outcomes) as sampler:
            asyncio.run(clients())
            time.sleep(1.0)  # cancelled sequences are dropped at the engine's next step
            sampler.samples.append(sampler.sample())
        ended = sampler.sample()
    return {"settings": asdict(settings), "repository": str(repository),
            "outcomes": [asdict(o) for o in outcomes], "samples": [asdict(s) for s in sampler.samples],
            "active_sequences_at_end": ended.active_sequences}


def _room(repository: Path) -> int:
    """The most new tokens a prompt-less request may ask for (the bad requests ask for one more)."""
    from transformers import AutoConfig

    from blip2_triton import repository as layout

    config = AutoConfig.from_pretrained(layout.assets_dir(repository))
    text = config.text_config
    if getattr(text, "is_encoder_decoder", False):
        return 512
    return text.max_position_embeddings - config.num_query_tokens - 1


def _slope(t: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope dy/dt."""
    if len(t) < 2 or np.ptp(t) == 0:
        return 0.0
    return float(np.polyfit(t, y, 1)[0])


def summarize(raw: dict) -> dict:
    """The numbers the report and the pass criterion use."""
    settings = raw["settings"]
    outcomes, samples = raw["outcomes"], raw["samples"]
    t = np.array([s["t"] for s in samples])
    total = np.array([sum(s["rss_mib"].values()) for s in samples])
    pss = np.array([sum(s["pss_mib"].values()) for s in samples])
    half = t >= settings["seconds"] / 2
    slope_mib_per_h = _slope(t[half], total[half]) * 3600
    slope_pct_per_h = 100 * slope_mib_per_h / float(total[half].mean()) if half.any() else 0.0
    warm = t >= min(settings["warmup_seconds"], settings["seconds"] / 2)
    after_warmup = float(total[warm][0]) if warm.any() else float(total[0])
    counts: dict[str, dict[str, int]] = {}
    failures = []
    for o in outcomes:
        row = counts.setdefault(o["kind"], {"ok": 0, "failed": 0})
        row["ok" if o["result"] == "ok" else "failed"] += 1
        if o["result"] != "ok":
            failures.append(o)
    edges = np.linspace(0, settings["seconds"], WINDOWS + 1)
    windows = []
    for a, b in zip(edges[:-1], edges[1:]):
        lat = [o["seconds"] for o in outcomes if o["kind"] in ("good", "stream", "beam") and o["result"] == "ok"
               and a <= o["start"] < b]
        windows.append({"from_s": round(float(a), 1), "to_s": round(float(b), 1), "requests": len(lat),
                        "p50_ms": 1000 * float(np.percentile(lat, 50)) if lat else None,
                        "p99_ms": 1000 * float(np.percentile(lat, 99)) if lat else None})
    by_process = {}
    for label in samples[-1]["rss_mib"]:
        series = [(s["t"], s["rss_mib"][label]) for s in samples if label in s["rss_mib"]]
        ts, ys = np.array([a for a, _ in series]), np.array([b for _, b in series])
        sel = ts >= settings["seconds"] / 2
        slope = _slope(ts[sel], ys[sel])
        by_process[label] = {"start_mib": float(ys[0]), "end_mib": float(ys[-1]),
                             "second_half_slope_mib_per_h": round(slope * 3600, 1),
                             "second_half_growth_mib": round(slope * float(np.ptp(ts[sel])) if sel.any() else 0.0, 2)}
    # tritonserver 2.51 keeps a few KiB per gRPC stream ever opened (client/aio.py), so its growth
    # is judged per stream the clients opened, which depends on the request rate, not per hour.
    opened = np.array([s["streams_opened"] for s in samples])
    second_half_streams = int(opened[half][-1] - opened[half][0]) if half.any() else 0
    summary = {
        "requests": len(outcomes), "by_kind": counts, "failures": len(failures), "failure_examples": failures[:10],
        "rss_start_mib": float(total[0]), "rss_after_warmup_mib": after_warmup, "rss_end_mib": float(total[-1]),
        "rss_peak_mib": float(total.max()),
        "growth_after_warmup_percent": round(100 * (float(total[-1]) - after_warmup) / after_warmup, 2),
        "second_half_slope_mib_per_h": round(slope_mib_per_h, 1),
        "second_half_slope_percent_per_h": round(slope_pct_per_h, 2),
        "pss_start_mib": float(pss[0]), "pss_end_mib": float(pss[-1]),
        "rss_by_process": by_process, "latency_windows": windows,
        "active_sequences_at_end": raw["active_sequences_at_end"],
        "streams_opened": int(opened[-1]), "second_half_streams_opened": second_half_streams,
    }
    summary["passed"] = bool(
        not failures and summary["active_sequences_at_end"] == 0 and slope_pct_per_h < settings["max_slope"])
    return summary


def report(raw: dict, summary: dict) -> str:
    s = raw["settings"]
    lines = [f"# Soak: {s['clients']} clients for {s['seconds'] / 60:g} min on `{Path(raw['repository']).parent.name}`",
             "", f"Command: `{raw.get('command', 'blip2-triton soak')}`", "",
             f"**{'PASSED' if summary['passed'] else 'FAILED'}**: {summary['failures']} failed requests of "
             f"{summary['requests']}; active sequences at the end: {summary['active_sequences_at_end']:g}; RSS slope "
             f"over the second half {summary['second_half_slope_percent_per_h']:+.2f} %/h "
             f"({summary['second_half_slope_mib_per_h']:+.1f} MiB/h; bound {s['max_slope']:g} %/h); growth after the "
             f"{s['warmup_seconds']:g} s warm-up {summary['growth_after_warmup_percent']:+.2f} %.", ""]
    lines.append(table(["kind", "answered as expected", "failed"],
                       [[k, v["ok"], v["failed"]] for k, v in sorted(summary["by_kind"].items())]))
    lines.append(table(["server memory (all processes)", "start", "after warm-up", "end", "peak"],
                       [["RSS MiB", summary["rss_start_mib"], summary["rss_after_warmup_mib"], summary["rss_end_mib"],
                         summary["rss_peak_mib"]],
                        ["PSS MiB", summary["pss_start_mib"], "", summary["pss_end_mib"], ""]]))
    lines.append(f"gRPC streams opened by the clients: {summary['streams_opened']} "
                 f"({summary['second_half_streams_opened']} in the second half).\n")
    lines.append(table(["process", "RSS start MiB", "RSS end MiB", "second-half slope MiB/h", "second-half growth MiB"],
                       [[k, v["start_mib"], v["end_mib"], v["second_half_slope_mib_per_h"], v["second_half_growth_mib"]]
                        for k, v in summary["rss_by_process"].items()]))
    lines.append(table(["window (s)", "good requests", "p50 ms", "p99 ms"],
                       [[f"{w['from_s']:g}-{w['to_s']:g}", w["requests"], w["p50_ms"], w["p99_ms"]]
                        for w in summary["latency_windows"]]))
    if summary["failure_examples"]:
        lines.append("Failures (first 10):\n")
        lines += [f"- {o['kind']} at {o['start']:.1f} s: {o['result']}" for o in summary["failure_examples"]]
    return "\n".join(lines) + "\n"


def plot(raw: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = raw["samples"]
    t = np.array([s["t"] for s in samples]) / 60
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    top.plot(t, [sum(s["rss_mib"].values()) for s in samples], label="RSS, all processes", linewidth=2)
    top.plot(t, [sum(s["pss_mib"].values()) for s in samples], label="PSS, all processes", linestyle="--")
    for label in samples[-1]["rss_mib"]:
        top.plot(t, [s["rss_mib"].get(label, np.nan) for s in samples], label=label, linewidth=0.8)
    top.plot(t, [s.get("kv_cache_mib", np.nan) for s in samples], label="blip2's KV cache (allocated)",
             linestyle=":", linewidth=1.2)
    top.set_ylabel("MiB")
    top.set_yscale("log")
    top.legend(fontsize=7, loc="center right")
    top.set_title(f"soak: {raw['settings']['clients']} clients; second-half RSS slope "
                  f"{summary['second_half_slope_percent_per_h']:+.2f} %/h")
    w = summary["latency_windows"]
    mid = [(x["from_s"] + x["to_s"]) / 120 for x in w]
    bottom.plot(mid, [x["p50_ms"] for x in w], marker="o", label="p50")
    bottom.plot(mid, [x["p99_ms"] for x in w], marker="o", label="p99")
    bottom.set_ylabel("good request latency, ms")
    bottom.set_xlabel("minutes")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=30.0, help="how long the clients run (default %(default)g)")
    p.add_argument("--seconds", type=float, help="instead of --minutes")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--model", default=None,
                   help="a preset (base-opt, tiny-opt, ...) or checkpoint directory, exported under --workdir "
                        "(default: the embedded trained model)")
    p.add_argument("--model-repository", help="serve this exported repository as it is instead of --model")
    p.add_argument("--workdir", default="artifacts/soak", help="checkpoints and exported repositories")
    p.add_argument("--output", default="benchmarks/results", help="where <name>.json, .md and .png go")
    p.add_argument("--name", help="file name stem (default soak-<model>-<minutes>min)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--warmup-seconds", type=float, default=120.0)
    p.add_argument("--max-slope", type=float, default=DEFAULT_MAX_SLOPE,
                   help="pass bound: second-half RSS slope, %% of RSS per hour (default %(default)g)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="good requests ask for 2..this many tokens")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="request kinds to mix, each at its default share (default %(default)s)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the server's processes (e.g. allocator settings); repeatable")


def run_from_args(args) -> int:
    import sys

    from blip2_triton.toy.embedded import TRAINED_MODEL

    from .workloads import prepare_model

    seconds = args.seconds if args.seconds else args.minutes * 60
    env = dict(item.split("=", 1) for item in args.env)
    if args.model_repository:
        repository = Path(args.model_repository)
        name = repository.resolve().parent.name if repository.name == "repository" else repository.name
    else:
        model = prepare_model(args.model or str(TRAINED_MODEL), Path(args.workdir))
        repository, name = model.repository, model.name
    settings = Settings(seconds=seconds, clients=args.clients, seed=args.seed, sample_every=args.sample_every,
                        warmup_seconds=args.warmup_seconds, max_slope=args.max_slope,
                        max_new_tokens=args.max_new_tokens, env=env,
                        kinds={k: KINDS[k] for k in args.kinds.split(",")})
    raw = run(repository, settings)
    raw["command"] = "blip2-triton " + " ".join(sys.argv[1:])
    summary = summarize(raw)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"soak-{name}-{seconds / 60:g}min"
    (out / f"{stem}.json").write_text(json.dumps({"summary": summary, **raw}, indent=1))
    text = report(raw, summary)
    (out / f"{stem}.md").write_text(text)
    plot(raw, summary, out / f"{stem}.png")
    print(text)
    print(f"wrote {out / stem}.json, .md, .png")
    return 0 if summary["passed"] else 1
