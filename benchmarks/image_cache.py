"""Follow-up questions with the image cache on and off, through tritonserver (issue 14's targets).

One prepared model (base-opt by default, as the main bench builds it) is served twice, side by side:
`blip2` with its image cache on and, from a linked copy of the repository, off. The two servers
take turns request by request, so that load from outside falls on both alike. On each, for fresh
pictures (never sent before to that server):

- first question on a picture, then a follow-up question on the same picture (sequential);
- 8 questions on a fresh picture at once through `ask_many`.

Targets: a follow-up with the cache takes <= 0.35x the first question; `ask_many` of 8 with the
cache <= 0.3x the same without it; tokens identical with the cache on and off. Run:

    python -m blip2_triton.benchmarks.image_cache [--model base-opt] [--workdir artifacts/bench]

Writes benchmarks/results/image_cache.json (every request's seconds and tokens) and prints tables.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from blip2_triton.repository import DEFAULT_IMAGE_CACHE_BYTES

from . import machine
from .tables import table
from .run import DEFAULT_WORKDIR
from .stages import PerWorkload
from .workloads import configure_image_cache, images, prepare_model

RESULTS = Path(__file__).parent / "results" / "image_cache.json"
QUESTIONS = [
    "what color is the square?", "how many shapes are there?", "what color is the circle?",
    "is there a triangle?", "what is on the left?", "what is the largest shape?",
    "what color is the background?", "how many circles are there?",
]
FOLLOW_UP_TARGET = 0.35
ASK_MANY_TARGET = 0.3


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(clients: dict, pictures: list[bytes], pairs: int, rounds: int, controls: dict,
            servers: dict | None = None) -> dict:
    """pictures[:pairs]: first + follow-up each; pictures[pairs:pairs+rounds]: ask_many of 8 each.
    Every step runs on each server in turn (clients: name -> Blip2Client). servers: name ->
    stages.PerWorkload, whose snapshots around each first and follow-up question break it down."""
    runs = {name: {"pairs": [], "ask_many": []} for name in clients}
    for client in clients.values():
        client.ask(pictures[-1], QUESTIONS[0], **controls)  # warm-up: sessions, connections

    def ask(name: str, kind: str, picture: bytes, question: str):
        server = (servers or {}).get(name)
        before = server.snapshot() if server else None
        seconds, result = _timed(lambda: clients[name].ask(picture, question, **controls))
        if server:
            server.add(kind, before, server.snapshot())
        return seconds, result

    for i in range(pairs):
        for name in clients:
            first_s, first = ask(name, "first", pictures[i], QUESTIONS[0])
            follow_s, follow = ask(name, "follow_up", pictures[i], QUESTIONS[1])
            runs[name]["pairs"].append({"picture": i, "first_s": first_s, "follow_up_s": follow_s,
                                        "first_tokens": first.token_ids, "follow_up_tokens": follow.token_ids})
    for r in range(rounds):
        i = pairs + r
        for name, client in clients.items():
            seconds, results = _timed(lambda: client.ask_many(pictures[i], QUESTIONS, **controls))
            runs[name]["ask_many"].append({"picture": i, "seconds": seconds, "tokens": [x.token_ids for x in results]})
    return runs


def summarize(on: dict, off: dict) -> dict:
    med = statistics.median
    first_on = med(p["first_s"] for p in on["pairs"])
    follow_on = med(p["follow_up_s"] for p in on["pairs"])
    first_off = med(p["first_s"] for p in off["pairs"])
    follow_off = med(p["follow_up_s"] for p in off["pairs"])
    many_on = med(r["seconds"] for r in on["ask_many"])
    many_off = med(r["seconds"] for r in off["ask_many"])
    tokens = lambda run: ([(p["first_tokens"], p["follow_up_tokens"]) for p in run["pairs"]],  # noqa: E731
                          [r["tokens"] for r in run["ask_many"]])
    return {
        "first_question_s": {"cache_on": first_on, "cache_off": first_off},
        "follow_up_s": {"cache_on": follow_on, "cache_off": follow_off},
        "ask_many_8_s": {"cache_on": many_on, "cache_off": many_off},
        "follow_up_over_first_cache_on": follow_on / first_on,
        "ask_many_on_over_off": many_on / many_off,
        "tokens_identical_on_off": tokens(on) == tokens(off),
        "targets": {"follow_up_over_first": FOLLOW_UP_TARGET, "ask_many_on_over_off": ASK_MANY_TARGET},
    }


def breakdown(stages: dict, latency_s: float) -> dict:
    """Where one question's time went on a server (ms, means over its requests): the image stages
    as Triton counts them, blip2's own time before its first token (engine_ttft: cache lookup or
    stage calls, tokenizing, the engine's queue, the prefill), the decode steps, and the rest of
    the client's latency (gRPC, Triton's scheduling, responses)."""
    g = stages.generator_metrics
    out = {f"{m}_ms": s.request_ms for m, s in stages.models.items() if m != "blip2"}
    steps = (g.decode_steps or 0) / max(g.prefills or 1, 1)
    out |= {"engine_ttft_ms": g.engine_ttft_ms, "prefill_ms": g.prefill_ms,
            "ttft_before_prefill_ms": (g.engine_ttft_ms or 0) - (g.prefill_ms or 0),
            "decode_steps": steps, "decode_step_ms": g.decode_step_ms,
            "decode_ms": steps * (g.decode_step_ms or 0), "detokenize_ms": (g.detokenize_ms or 0) * (g.detokenize_per_request or 0)}
    out["client_ms"] = latency_s * 1e3
    out["outside_blip2_ms"] = out["client_ms"] - (g.engine_ttft_ms or 0) - out["decode_ms"] - out["detokenize_ms"]
    return out


def in_process_costs(picture: bytes, repo: Path, repeat: int = 200) -> dict:
    """What a cache hit adds in `blip2` before the engine, timed in this process (ms, median):
    hashing the image bytes for the key, and tokenizing the prompt."""
    from blip2_triton.repository import assets_dir
    from blip2_triton.serving.image_cache import image_key
    from blip2_triton.serving.preprocess import encode_prompt, load_tokenizer
    from blip2_triton.serving.service import preprocessing_settings

    settings = preprocessing_settings(repo)
    tokenizer = load_tokenizer(assets_dir(repo))
    prompt = f"Question: {QUESTIONS[1]} Answer:".encode()

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return {"image_bytes": len(picture), "image_key_ms": median_ms(lambda: image_key(picture, settings)),
            "tokenize_prompt_ms": median_ms(lambda: encode_prompt(tokenizer, prompt))}


def render(summary: dict) -> str:
    ms = lambda s: round(s * 1e3, 1)  # noqa: E731
    rows = [[name, ms(summary[key]["cache_on"]), ms(summary[key]["cache_off"]),
             round(summary[key]["cache_on"] / summary[key]["cache_off"], 3)]
            for name, key in (("first question on a picture", "first_question_s"),
                              ("follow-up question, same picture", "follow_up_s"),
                              ("8 questions at once (ask_many)", "ask_many_8_s"))]
    lines = [table(["p50 (ms)", "cache on", "cache off", "on / off"], rows), ""]
    lines.append(f"follow-up / first question, cache on: {summary['follow_up_over_first_cache_on']:.3f} "
                 f"(target <= {FOLLOW_UP_TARGET})")
    lines.append(f"ask_many of 8, cache on / off: {summary['ask_many_on_over_off']:.3f} (target <= {ASK_MANY_TARGET})")
    lines.append(f"tokens identical with the cache on and off: {summary['tokens_identical_on_off']}")
    parts = summary.get("breakdown")
    if parts:
        keys = sorted({k for v in parts.values() for k in v})
        cols = list(parts)
        lines += ["", table(["mean per question (ms)", *cols],
                            [[k, *[round(parts[c].get(k) or 0, 1) for c in cols]] for k in keys])]
    if summary.get("in_process"):
        lines.append(f"in-process, per cache hit: {summary['in_process']}")
    return "\n".join(lines)


def _linked_copy(repo: Path, target: Path) -> Path:
    """A copy of `repo` whose graphs are hard links (no second copy on disk); its config.pbtxt and
    model.py files are its own, so they can be rewritten without touching `repo`'s."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(repo, target, copy_function=os.link)
    for own in (*target.glob("*/config.pbtxt"), *target.glob("*/1/model.py")):
        own.unlink()
    return target


def main(argv: list[str] | None = None) -> int:
    from blip2_triton.client import Blip2Client
    from blip2_triton.server.launcher import TritonServer
    from blip2_triton.serving.onnx_graph import THREADS_ENV

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base-opt", help="preset or checkpoint directory (as `blip2-triton bench`)")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=6, help="pictures asked a first and a follow-up question")
    p.add_argument("--rounds", type=int, default=3, help="pictures asked 8 questions at once")
    p.add_argument("--vqa-tokens", type=int, default=10)
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)

    model = prepare_model(args.model, Path(args.workdir))
    pictures = images(args.pairs + args.rounds + 1)
    if len(set(pictures)) != len(pictures):
        raise SystemExit("pictures repeat: lower --pairs/--rounds")
    controls = {"max_new_tokens": args.vqa_tokens, "min_new_tokens": args.vqa_tokens}
    logs = Path(args.workdir) / model.name / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    configure_image_cache(model, DEFAULT_IMAGE_CACHE_BYTES)
    uncached = _linked_copy(model.repository, Path(args.workdir) / model.name / "repository-no-image-cache")
    configure_image_cache(dataclasses.replace(model, repository=uncached), None)
    with contextlib.ExitStack() as stack:
        clients, servers = {}, {}
        for name, repo in (("cache_on", model.repository), ("cache_off", uncached)):
            server = stack.enter_context(TritonServer(
                repo, grpc_port=None, http_port=None, metrics_port=None, log_file=logs / f"image_cache_{name}.log",
                startup_timeout=600, env={THREADS_ENV: str(args.threads)}))
            clients[name] = stack.enter_context(Blip2Client(server.grpc_url, timeout=600))
            servers[name] = PerWorkload(server.grpc_url, server.metrics_url)
            stack.callback(servers[name].close)
        print("measuring", file=sys.stderr)
        runs = measure(clients, pictures, args.pairs, args.rounds, controls, servers)
    summary = summarize(runs["cache_on"], runs["cache_off"])
    med = statistics.median
    summary["breakdown"] = {
        f"{name} {kind}": breakdown(stages, med(p[f"{kind}_s"] for p in runs[name]["pairs"]))
        for name, server in servers.items() for kind, stages in server.result().items()}
    summary["in_process"] = in_process_costs(pictures[0], model.repository)
    out = {"facts": machine.facts(args.threads, Path(__file__).resolve().parents[1]), "model": model.as_dict(),
           "settings": vars(args) | {"questions": QUESTIONS}, "summary": summary, "runs": runs}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(render(summary))
    print(f"raw results: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
