"""Export at scale: a BLIP-2 whose OPT-1.3B-class decoder (4.9 GB fp32) is over protobuf's 2 GiB.

Builds the random-weight checkpoint locally, exports and validates it in a child process, and
records wall time and the child's peak RSS against the weights' size (the exporter aims at no
more than about two copies of the weights). Run:

    python -m blip2_triton.benchmarks.export_scale [--workdir artifacts/export-scale]

Writes benchmarks/results/export_scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from blip2_triton.toy import presets

LARGE = presets.TinyPreset(
    image_size=224, patch_size=14, vision_hidden=768, vision_layers=12, vision_heads=12,
    qformer_hidden=768, qformer_layers=12, qformer_heads=12, num_query_tokens=32,
    text_hidden=2048, text_layers=24, text_heads=32, max_position_embeddings=2048, init_std=0.02,
)
RESULTS = Path(__file__).parent / "results" / "export_scale.json"


def _child(stage: str, workdir: Path) -> None:
    presets.ALL_PRESETS["large-opt"] = LARGE  # the table build_tiny_checkpoint reads
    if stage == "build":
        presets.build_tiny_checkpoint(workdir / "checkpoint", "large-opt")
        return
    from blip2_triton.export.exporter import export_checkpoint

    report = export_checkpoint(workdir / "checkpoint", workdir / "repository")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"graphs": report.graphs, "max_abs_diff": report.max_abs_diff, "peak_rss_bytes": peak}))


def _commit() -> str:
    """HEAD, marked "+dirty" when the code the export runs (export/, src/) has uncommitted changes."""
    from .machine import git

    here = Path(__file__).parent
    head = git(here, "rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git(here, "status", "--porcelain", "--", "../export", "../src") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="artifacts/export-scale")
    parser.add_argument("--child", choices=["build", "export"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    if args.child:
        _child(args.child, workdir)
        return 0
    me = [sys.executable, "-m", "blip2_triton.benchmarks.export_scale", "--workdir", str(workdir)]
    if not (workdir / "checkpoint" / "model.safetensors").exists():
        print("building the random-weight checkpoint ...", flush=True)
        subprocess.run(me + ["--child", "build"], check=True)
    print("exporting (progress below) ...", flush=True)
    start = time.perf_counter()
    done = subprocess.run(me + ["--child", "export"], check=True, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peak = result["peak_rss_bytes"]
    weights = sum(g["bytes"] for g in result["graphs"].values())
    result.update(seconds=round(seconds, 1), weight_bytes=weights, peak_over_weights=round(peak / weights, 2),
                  commit=_commit(), date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(),
                  ram_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"export + validation: {seconds:.0f} s; peak RSS {peak / 2**30:.1f} GiB for {weights / 2**30:.1f} GiB "
          f"of weights ({peak / weights:.2f}x); decoder graph {result['graphs']['llm_decoder']['bytes'] / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
