"""int8 and int4 weights against fp32 on the bench's requests: token agreement and latency, in process.

    python -m blip2_triton.benchmarks.quantized [--model base-opt] [--images 16] [--reps 3]

Exports the model three ways (fp32, `--quantize int8`, `--quantize int4`; cached in
`--workdir/<model>/` as the bench caches its exports), then sends the bench's workloads
(workloads.workloads(): a 30-token caption and a 10-token VQA answer, fixed length, greedy) on
`--images` of the bench's pictures to the three in-process pipelines in turn, request by request,
so machine load hits them alike. Per quantization: requests generating the fp32 tokens, the mean
share of a request's tokens before the first difference, and p50 latency per workload against
fp32. Writes benchmarks/results/quantized_<model>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

QUANTIZATIONS = ("int8", "int4")
ROOT = Path(__file__).resolve().parent.parent


def prepare(model: str, workdir: Path) -> dict[str, Path]:
    """fp32, int8 and int4 repositories of `model`, exported unless the bench's cache holds them."""
    from blip2_triton.export.exporter import export_checkpoint

    from .workloads import _code_fingerprint, prepare_model

    prepared = prepare_model(model, workdir, int8=True)
    repos = {"fp32": prepared.repository, "int8": prepared.int8_repository}
    int4 = prepared.repository.parent / "repository-int4"
    stamp = int4.parent / "stamp-int4.json"
    key = {"checkpoint": str(prepared.checkpoint), "code": _code_fingerprint(),
           "weights": (prepared.checkpoint / "model.safetensors").stat().st_mtime}
    if not (stamp.exists() and json.loads(stamp.read_text()) == key and int4.exists()):
        export_checkpoint(prepared.checkpoint, int4, quantize="int4", progress=False)
        stamp.write_text(json.dumps(key))
    repos["int4"] = int4
    return repos


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """Requests whose tokens equal the reference's, and the mean share agreeing before the first difference."""
    prefixes = []
    for ours, ref in zip(tokens, reference):
        first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        prefixes.append(first / max(len(ref), 1))
    return {"compared": len(tokens), "identical": sum(a == b for a, b in zip(tokens, reference)),
            "mean_agreeing_prefix": round(statistics.mean(prefixes), 4) if prefixes else None}


def run(repos: dict[str, Path], images: int, reps: int, threads: int) -> dict:
    from blip2_triton.serving.pipeline import LocalPipeline

    from .workloads import images as pictures
    from .workloads import workloads

    pipes = {name: LocalPipeline(repo, threads=threads) for name, repo in repos.items()}
    photos = pictures(images)
    result = {"images": images, "reps": reps, "threads": threads, "workloads": {}}
    for w in workloads():
        tokens = {name: [] for name in pipes}
        latency = {name: [] for name in pipes}
        for pipe in pipes.values():  # warm-up
            pipe(photos[0], w.prompt, **w.controls)
        for rep in range(reps):
            for photo in photos:
                for name, pipe in pipes.items():
                    start = time.perf_counter()
                    out = pipe(photo, w.prompt, **w.controls)
                    latency[name].append((time.perf_counter() - start) * 1e3)
                    if rep == 0:
                        tokens[name].append(out.token_ids)
        p50 = {name: round(statistics.median(v), 1) for name, v in latency.items()}
        result["workloads"][w.name] = {
            "prompt": w.prompt, "max_new_tokens": w.max_new_tokens, "latency_ms_p50": p50,
            "agreement_with_fp32": {q: agreement(tokens[q], tokens["fp32"]) for q in QUANTIZATIONS},
            "tokens": tokens,
        }
    result["decoder_bytes"] = {name: sum(p.stat().st_size for p in (repo / "blip2" / "1").glob("*.onnx*"))
                               for name, repo in repos.items()}
    return result


def table(result: dict) -> str:
    rows = ["| workload | weights | decoder MB | requests with fp32's tokens | tokens agreeing before the first difference | p50 ms | / fp32 |",
            "|---|---|---|---|---|---|---|"]
    for name, w in result["workloads"].items():
        fp32 = w["latency_ms_p50"]["fp32"]
        for q in ("fp32", *QUANTIZATIONS):
            a = w["agreement_with_fp32"].get(q)
            same = f"{a['identical']} of {a['compared']}" if a else "(reference)"
            prefix = f"{100 * a['mean_agreeing_prefix']:.0f}%" if a else ""
            rows.append(f"| {name} ({w['max_new_tokens']} tokens) | {q} | {result['decoder_bytes'][q] / 1e6:.1f} | {same} "
                        f"| {prefix} | {w['latency_ms_p50'][q]} | {w['latency_ms_p50'][q] / fp32:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from .machine import git

    parser = argparse.ArgumentParser(prog="python -m blip2_triton.benchmarks.quantized", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base-opt", help="a preset or a checkpoint directory")
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "bench")
    parser.add_argument("--images", type=int, default=16, help="of the bench's pictures")
    parser.add_argument("--reps", type=int, default=3, help="timed passes over the requests (tokens from the first)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/quantized_<model>.json")
    args = parser.parse_args(argv)
    repos = prepare(args.model, args.workdir)
    result = run(repos, args.images, args.reps, args.threads)
    here = Path(__file__).parent
    result.update(model=args.model, date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(),
                  commit=git(here, "rev-parse", "--short", "HEAD") or "unknown",
                  load_average=os.getloadavg())
    output = args.output or here / "results" / f"quantized_{Path(args.model).name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"raw numbers: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
