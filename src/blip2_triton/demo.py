"""`blip2-triton demo`: export the embedded models, start the real Triton server, answer requests, stop.

Both embedded trained generation models run, the OPT one and its Flan-T5 sibling, each with its own model
repository and server, one after the other: every repository names its models `blip2`,
`preprocess`, `vision_encoder` and `qformer`, so one server cannot hold both. Then the retrieval sibling: the samples indexed, searched by
their captions, and matched with a right and a wrong caption.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .toy import embedded
from .toy.model import FAMILY_NAMES


def run_demo(workdir: str | Path = "artifacts/demo", model: str | None = None) -> int:
    workdir = Path(workdir)
    if model:
        checkpoints = {_family(Path(model)): Path(model)}
    else:
        checkpoints = embedded.default_checkpoints(workdir / "checkpoints")
    for i, (family, checkpoint) in enumerate(checkpoints.items()):
        title = f"BLIP-2 {FAMILY_NAMES.get(family, family)}: {checkpoint.name}"
        print(("\n" if i else "") + f"=== {title} " + "=" * max(3, 76 - len(title)), flush=True)
        _demo_one(checkpoint, workdir / f"model_repository-{family}")
    if not model and (embedded.RETRIEVAL_MODEL / "model.safetensors").exists():
        title = f"BLIP-2 image-text retrieval: {embedded.RETRIEVAL_MODEL.name}"
        print(f"\n=== {title} " + "=" * max(3, 76 - len(title)), flush=True)
        _demo_retrieval(embedded.RETRIEVAL_MODEL, workdir / "model_repository-retrieval")
    return 0


def _family(checkpoint: Path) -> str:
    """The checkpoint's language-model family (`text_config.model_type`), for the heading."""
    config = checkpoint / "config.json"
    return json.loads(config.read_text())["text_config"]["model_type"] if config.is_file() else "?"


def _demo_one(checkpoint: Path, repo: Path) -> None:
    """Export `checkpoint` into `repo`, serve it, caption and question the samples, stop."""
    from blip2_triton.client import Blip2Client
    from blip2_triton.export.exporter import export_checkpoint
    from blip2_triton.server.launcher import TritonServer

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
            # A caption streamed piece by piece (the tiny models know only their scene vocabulary,
            # so a prompt like "a photo of" would get an empty continuation).
            first = embedded.samples()[0].path
            pieces = list(client.stream(first))
            print(f"  streamed caption of {first.name}: {pieces}")
    print("server stopped", flush=True)


def _demo_retrieval(checkpoint: Path, repo: Path) -> None:
    """Export the retrieval checkpoint, serve it, index the samples into a throwaway local Qdrant
    collection, find each sample by its caption, and match one with a right and a wrong caption."""
    import tempfile

    from blip2_triton.client import Blip2Client
    from blip2_triton.client.index import ImageIndex
    from blip2_triton.export.exporter import export_checkpoint
    from blip2_triton.server.launcher import TritonServer

    print(f"[1/3] exporting {checkpoint} -> {repo}", flush=True)
    report = export_checkpoint(checkpoint, repo)
    print(f"      validated in {report.seconds:.1f}s", flush=True)
    print("[2/3] starting tritonserver", flush=True)
    samples = embedded.samples()
    with TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None) as server, \
            Blip2Client(server.grpc_url) as client, tempfile.TemporaryDirectory() as db, \
            ImageIndex("samples", db=db) as index:
        print(f"[3/3] indexing {len(samples)} sample images, then searching them by caption", flush=True)
        client.index(index, embedded.SAMPLES)
        for sample in samples:
            top = client.search_text(index, sample.caption, top_k=1, rerank=len(samples))[0]
            print(f"  {sample.caption!r:50} -> {Path(top.path).name} (ITM {top.itm_probability:.3f}; "
                  f"{'right' if Path(top.path) == sample.path else 'WRONG'} scene)")
        sample = samples[-1]
        wrong = sample.caption.replace(sample.caption.split()[1], "purple" if "purple" not in sample.caption else "red", 1)
        for text in (sample.caption, wrong):
            m = client.match(sample.path, text)
            print(f"  match {sample.path.name} {text!r}: ITM {m.itm_probability:.3f}, ITC {m.itc_similarity:.3f}")
    print("server stopped", flush=True)
