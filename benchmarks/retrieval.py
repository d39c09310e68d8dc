"""`blip2-triton bench-retrieval`: the retrieval rows (issue 13), side by side with transformers in
one run.

    blip2-triton bench-retrieval                  # base-itm and the trained blip2-tiny-scenes-itm; index 10,000
    blip2-triton bench-retrieval --quick          # a smoke run

Per model (a preset is built with random weights, a checkpoint used as it is; both exported and
validated as `blip2-triton export` does) it starts the real tritonserver and, in the same process,
transformers' Blip2ForImageTextRetrieval on the same weights and thread count, then alternates
requests between the two (so machine load hits both alike):

- `embed_image` (one image -> [Q, D]) and `match` (one ITM pair -> probability; ours also returns
  the ITC similarity) latency, one request at a time;
- `embed_image` throughput: a set of images through the server with `concurrency` requests in
  flight, against transformers embedding the same images in batches.

For the trained model it also indexes `--index-images` held-out scenes through the server into a
local Qdrant collection (`client.index`, what `blip2-triton index` runs) and times `search` at
that size, with and without ITM re-ranking, checking that the searches find the right scene.
Raw numbers go to `--output`/retrieval.json, the tables to retrieval.md (and stdout).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .tables import fmt, ratio, table

log = logging.getLogger("blip2_triton.bench")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results"
DEFAULT_WORKDIR = ROOT / "artifacts" / "bench"
TRAINED = "blip2-tiny-scenes-itm"


@dataclass(frozen=True)
class Settings:
    threads: int = 2
    reps: int = 30  # interleaved single requests per call and system
    warmup: int = 3
    throughput_images: int = 64
    concurrency: int = 8  # requests in flight for the server's throughput; transformers' batch size
    index_images: int = 10_000
    queries: int = 50  # text searches per setting
    rerank: int = 10
    top_k: int = 5

    @classmethod
    def quick(cls) -> "Settings":
        return cls(reps=3, warmup=1, throughput_images=8, index_images=200, queries=5)


def percentiles(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(p99, 3), "n": len(ms), "raw_ms": [round(x, 3) for x in ms]}


class Oracle:
    """transformers on the same checkpoint: the same three calls, from image bytes and text, with
    the processor's own preprocessing and the forward pass's own modules (Q-Former, projections)."""

    def __init__(self, checkpoint: Path, threads: int):
        import torch
        from transformers import AutoProcessor, Blip2ForImageTextRetrieval

        torch.set_num_threads(threads)
        self.model = Blip2ForImageTextRetrieval.from_pretrained(checkpoint).eval()
        self.processor = AutoProcessor.from_pretrained(checkpoint)

    @staticmethod
    def _pil(images: list[bytes]):
        import io

        from PIL import Image

        return [Image.open(io.BytesIO(b)).convert("RGB") for b in images]

    def embed_images(self, images: list[bytes]):
        """[N, Q, D] normalized query embeddings, as forward(use_image_text_matching_head=False) computes them."""
        import torch

        m = self.model
        pixel_values = self.processor.image_processor(self._pil(images), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            image_embeds = m.vision_model(pixel_values=pixel_values).last_hidden_state
            queries = m.query_tokens.expand(len(images), -1, -1)
            q = m.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
            return torch.nn.functional.normalize(m.vision_projection(q), dim=-1).numpy()

    def itm(self, image: bytes, text: str) -> float:
        import torch

        inputs = self.processor(images=self._pil([image]), text=text, return_tensors="pt")
        with torch.inference_mode():
            out = self.model(**inputs, use_image_text_matching_head=True)
        return float(out.logits_per_image.softmax(1)[0, 1])


def _alternate(calls: dict, reps: int, warmup: int) -> dict:
    """Time each named zero-argument call `reps` times, the systems taking turns."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: percentiles(v) for name, v in times.items()}


def bench_calls(model, client, oracle: Oracle, settings: Settings) -> dict:
    """Latency of embed_image and of one ITM pair, and embed_image throughput, ours against transformers."""
    import concurrent.futures as cf

    from .workloads import images as make_images

    size = oracle.model.config.vision_config.image_size
    pictures = make_images(max(settings.throughput_images, 4), (size, size))
    text = "a red circle and a blue square"
    image = pictures[0]
    found = {"embed_image_latency": _alternate({"server": lambda: client.embed_image(image),
                                                "transformers": lambda: oracle.embed_images([image])},
                                               settings.reps, settings.warmup),
             "itm_pair_latency": _alternate({"server": lambda: client.match(image, text),
                                             "transformers": lambda: oracle.itm(image, text)},
                                            settings.reps, settings.warmup)}
    batch = pictures[: settings.throughput_images]
    c = settings.concurrency
    runs = {"server": [], "transformers": []}
    with cf.ThreadPoolExecutor(c) as pool:
        for _ in range(3):  # three rounds, alternating; the best of each is its rate
            t = time.perf_counter()
            list(pool.map(client.embed_image, batch))
            runs["server"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(0, len(batch), c):
                oracle.embed_images(batch[i : i + c])
            runs["transformers"].append(time.perf_counter() - t)
    found["embed_image_throughput"] = {
        name: {"images_per_s": round(len(batch) / min(v), 2), "rounds_s": [round(x, 3) for x in v]}
        for name, v in runs.items()} | {"images": len(batch), "server_concurrency": c, "transformers_batch": c}
    return found


def bench_index(client, settings: Settings, workdir: Path) -> dict:
    """Index held-out scenes through the server into local Qdrant, then time text searches."""
    from blip2_triton.client.index import ImageIndex
    from blip2_triton.toy.scenes import HELDOUT_SEED, make_scene

    gallery = workdir / f"scenes-{settings.index_images}"
    captions_file = gallery / "captions.json"
    if not captions_file.exists():
        gallery.mkdir(parents=True, exist_ok=True)
        captions = {}
        for seed in range(HELDOUT_SEED, HELDOUT_SEED + settings.index_images):
            scene = make_scene(seed)
            scene.image.save(gallery / f"scene_{seed}.png")
            captions[f"scene_{seed}.png"] = scene.caption
        captions_file.write_text(json.dumps(captions))
    captions = json.loads(captions_file.read_text())
    found = {"images": settings.index_images}
    with tempfile.TemporaryDirectory() as db, ImageIndex("bench", db=db) as index:
        t = time.perf_counter()
        report = client.index(index, gallery, concurrency=settings.concurrency * 4)
        seconds = time.perf_counter() - t
        found["index"] = {"seconds": round(seconds, 2), "images_per_s": round(report.indexed / seconds, 1),
                          "indexed": report.indexed, "refused": len(report.refused), "count": index.count()}
        rng = random.Random(0)
        queries = [captions[name] for name in rng.sample(sorted(captions), settings.queries)]
        for rerank in (0, settings.rerank):
            times, right = [], 0
            client.search_text(index, queries[0], top_k=settings.top_k, rerank=rerank)  # warm up
            for q in queries:
                t = time.perf_counter()
                hits = client.search_text(index, q, top_k=settings.top_k, rerank=rerank)
                times.append(time.perf_counter() - t)
                right += captions[Path(hits[0].path).name] == q
            found[f"search_rerank_{rerank}"] = percentiles(times) | {"top1_caption_right": right / len(queries)}
    return found


def run(models: list[str], settings: Settings, workdir: Path, output: Path) -> dict:
    from blip2_triton.client import Blip2Client
    from blip2_triton.server.launcher import TritonServer
    from blip2_triton.serving.onnx_graph import THREADS_ENV

    from . import machine
    from .workloads import prepare_model

    results = {"facts": machine.facts(settings.threads, ROOT), "settings": settings.__dict__, "models": {}}
    for spec in models:
        print(f"[{spec}] building / exporting", file=sys.stderr)
        model = prepare_model(spec, workdir)
        logs = workdir / model.name / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        oracle = Oracle(model.checkpoint, settings.threads)
        with TritonServer(model.repository, grpc_port=None, http_port=None, metrics_port=None,
                          log_file=logs / "tritonserver-retrieval.log", startup_timeout=600,
                          env={THREADS_ENV: str(settings.threads)}) as server, \
                Blip2Client(server.grpc_url, timeout=300) as client:
            print(f"[{spec}] calls, side by side with transformers", file=sys.stderr)
            found = {"source": model.source, "calls": bench_calls(model, client, oracle, settings)}
            if model.name == TRAINED:
                print(f"[{spec}] indexing {settings.index_images} images, then searching", file=sys.stderr)
                found["search"] = bench_index(client, settings, workdir)
        results["models"][model.name] = found
    results["facts"]["load_average_at_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    output.mkdir(parents=True, exist_ok=True)
    (output / "retrieval.json").write_text(json.dumps(results, indent=1) + "\n")
    (output / "retrieval.md").write_text(report(results))
    return results


def report(results: dict) -> str:
    """The markdown tables of one run."""
    threads = results["facts"]["threads"]["torch.set_num_threads"]
    rows = []
    for name, m in results["models"].items():
        calls = m["calls"]
        for call, key in (("embed_image, 1 image", "embed_image_latency"), ("match, 1 ITM pair", "itm_pair_latency")):
            ours, theirs = calls[key]["server"], calls[key]["transformers"]
            rows.append([name, call, ours["p50_ms"], ours["p99_ms"], theirs["p50_ms"], theirs["p99_ms"],
                         fmt(ratio(ours["p50_ms"], theirs["p50_ms"]), 2)])
    out = [f"Retrieval calls: ours (Triton + gRPC, fp32) against transformers {threads} threads, "
           f"requests alternating, one at a time\n",
           table(["model", "call", "ours p50 ms", "ours p99 ms", "transformers p50 ms", "transformers p99 ms",
                  "ours / transformers (p50)"], rows)]
    rows = []
    for name, m in results["models"].items():
        t = m["calls"]["embed_image_throughput"]
        rows.append([name, t["images"], t["server"]["images_per_s"], t["transformers"]["images_per_s"],
                     fmt(ratio(t["server"]["images_per_s"], t["transformers"]["images_per_s"]), 2)])
    out += [f"\n`embed_image` throughput: ours with {t['server_concurrency']} requests in flight, "
            f"transformers in batches of {t['transformers_batch']}\n",
            table(["model", "images", "ours images/s", "transformers images/s", "ours / transformers"], rows)]
    for name, m in results["models"].items():
        if "search" not in m:
            continue
        s = m["search"]
        out.append(f"\nImage search, {name}: index {s['images']:,} images through the server into local Qdrant "
                   f"({s['index']['seconds']} s, {s['index']['images_per_s']} images/s), then text searches\n")
        out.append(table(["search", "p50 ms", "p99 ms", "queries", "top-1 has the query's caption"], [
            [f"ITC only (MAX_SIM over {s['images']:,} multivectors)" if k == "search_rerank_0" else
             f"ITC, then ITM re-rank of the top {k.rsplit('_', 1)[1]}", v["p50_ms"], v["p99_ms"], v["n"],
             fmt(v["top1_caption_right"], 2)]
            for k, v in s.items() if k.startswith("search_rerank_")]))
    f = results["facts"]
    out.append(f"\n{f['date']}, {f['cpu']}, {f['usable_cores']} cores, load average {f['load_average_at_start']} at "
               f"the start and {f.get('load_average_at_end')} at the end, commit {f['git'].get('commit', '?')}\n")
    return "".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from blip2_triton.toy.embedded import RETRIEVAL_MODEL

    p.add_argument("--model", action="append", dest="models",
                   help=f"a retrieval preset or checkpoint (repeatable); default: base-itm and {RETRIEVAL_MODEL.name}")
    p.add_argument("--quick", action="store_true", help="a smoke run: few requests, a 200-image index")
    p.add_argument("--threads", type=int, default=Settings.threads)
    p.add_argument("--index-images", type=int, default=None)
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR))


def main(args) -> int:
    from blip2_triton.toy.embedded import RETRIEVAL_MODEL

    settings = Settings.quick() if args.quick else Settings()
    overrides = {"threads": args.threads} | ({"index_images": args.index_images} if args.index_images else {})
    settings = Settings(**(settings.__dict__ | overrides))
    results = run(args.models or ["base-itm", str(RETRIEVAL_MODEL)], settings, Path(args.workdir), Path(args.output))
    print(report(results))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m blip2_triton.benchmarks.retrieval")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
