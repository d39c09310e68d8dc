"""Shared fixtures: tiny checkpoints built offline and their exported repositories, once per session."""
from __future__ import annotations

import io
import os
import time
import urllib.request

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """preset name -> checkpoint directory (built lazily)."""
    from blip2_triton.toy.presets import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    cache = {}

    def get(preset: str):
        if preset not in cache:
            cache[preset] = build_tiny_checkpoint(root / preset, preset)
        return cache[preset]

    return get


@pytest.fixture(scope="session")
def exported(tiny_checkpoints, tmp_path_factory):
    """preset name -> (checkpoint directory, validated model repository)."""
    from blip2_triton.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("repos")
    cache = {}

    def get(preset: str):
        if preset not in cache:
            ckpt = tiny_checkpoints(preset)
            report = export_checkpoint(ckpt, root / preset, progress=False)
            cache[preset] = (ckpt, root / preset, report)
        return cache[preset]

    return get


@pytest.fixture(scope="session")
def pipeline(exported):
    """The served pipeline of tiny-opt in process (LocalPipeline), for engine and cache tests."""
    from blip2_triton.serving.pipeline import LocalPipeline

    _, repo, _ = exported("tiny-opt")
    return LocalPipeline(repo)


def run_together(pipeline, jobs, timeout: float = 60):
    """Submit every (image, prompt, controls) job to a fresh Engine before it starts, so
    they decode side by side; -> (each job's final token ids, in job order; the stopped engine)."""
    import threading

    from blip2_triton.serving.engine import Engine

    engine = Engine(pipeline.generator.language_model)
    results, done = {}, threading.Event()

    def on_tokens(index):
        def callback(ids, new, final):
            if final:
                results[index] = [int(t) for t in ids]
                if len(results) == len(jobs):
                    done.set()
        return callback

    for i, (image, prompt, controls) in enumerate(jobs):
        pixels, prompt_ids = pipeline.stages.preprocess(image, prompt.encode())
        engine.submit(pipeline.generator.request(pipeline.stages.query_embeds(pixels), prompt_ids, controls,
                                                 on_tokens=on_tokens(i)))
    engine.start()
    try:
        assert done.wait(timeout), f"{len(results)} of {len(jobs)} jobs finished in {timeout} s"
    finally:
        engine.stop()
    return [results[i] for i in range(len(jobs))], engine


def random_image(seed: int, size=(40, 52)) -> bytes:
    """A PNG of random pixels (deterministic per seed)."""
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def metric(server, name: str) -> float:
    """A Prometheus metric on the server's metrics endpoint, summed over its labels; NaN if absent."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        lines = r.read().decode().splitlines()
    values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((name + "{", name + " "))]
    return sum(values) if values else float("nan")


def wait_for_active(server, count: int, timeout: float = 30) -> float:
    """Seconds until blip2_active_sequences reads `count`."""
    start = time.monotonic()
    while metric(server, "blip2_active_sequences") != count:
        assert time.monotonic() - start < timeout, f"blip2_active_sequences never read {count}"
        time.sleep(0.005)
    return time.monotonic() - start
