"""`blip2-triton demo`: export the embedded model, start the real Triton server, answer requests, stop."""
from __future__ import annotations

import time
from pathlib import Path

from .toy import embedded


def run_demo(workdir: str | Path = "artifacts/demo", model: str | None = None) -> int:
    from blip2_triton.client import Blip2Client
    from blip2_triton.export.exporter import export_checkpoint
    from blip2_triton.server.launcher import TritonServer

    workdir = Path(workdir)
    checkpoint = model or embedded.default_checkpoint(workdir / "checkpoints")
    repo = workdir / "model_repository"
    print(f"[1/3] exporting {checkpoint} -> {repo}", flush=True)
    report = export_checkpoint(checkpoint, repo)
    print(f"      validated in {report.seconds:.1f}s: " + ", ".join(
        f"{g} max|diff| {d:.1e}" for g, d in report.max_abs_diff.items()), flush=True)
    print("[2/3] starting tritonserver", flush=True)
    with TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None) as server:
        print(f"      ready in {server.startup_seconds:.1f}s at {server.grpc_url} (gRPC), {server.http_url} (HTTP)",
              flush=True)
        print("[3/3] asking over gRPC", flush=True)
        with Blip2Client(server.grpc_url) as client:
            for sample in embedded.samples():
                start = time.perf_counter()
                caption = client.caption(sample.path)
                took = (time.perf_counter() - start) * 1000
                answer = client.generate(sample.path, sample.question)
                print(f"  {sample.path.name}")
                print(f"    caption : {caption.text.strip()!r:40} ({took:.0f} ms; expected {sample.caption!r})")
                print(f"    {sample.question} {answer.text.strip()!r} (expected {sample.answer!r})")
            # A caption streamed piece by piece (the tiny model knows only its scene vocabulary,
            # so a prompt like "a photo of" would get an empty continuation).
            first = embedded.samples()[0].path
            pieces = list(client.stream(first))
            print(f"  streamed caption of {first.name}: {pieces}")
    print("server stopped")
    return 0
