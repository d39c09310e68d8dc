"""Shared fixtures and helpers: tiny checkpoints built offline, their exported repositories, the
served tiny model, and transformers' generate() as the reference, once per session."""
from __future__ import annotations

import asyncio
import functools
import io
import os
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

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
def embedded_repository(tmp_path_factory):
    """The embedded trained model (toy.embedded.TRAINED_MODEL) exported (fp32, validated), once."""
    from blip2_triton.export.exporter import export_checkpoint
    from blip2_triton.toy.embedded import TRAINED_MODEL

    repo = tmp_path_factory.mktemp("repos") / "blip2-tiny-scenes"
    export_checkpoint(TRAINED_MODEL, repo, progress=False)
    return repo


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


def http_generate(server, model: str, endpoint: str, body: dict) -> tuple[int, str]:
    """POST `body` to Triton's HTTP generate extension (`endpoint`: generate or generate_stream)
    of `model`; -> (status, body text), error statuses included."""
    import json
    import urllib.error

    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/{endpoint}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def popen_interruptible(argv: list[str], **kwargs):
    """subprocess.Popen with SIGINT at its default in the child, as a terminal leaves it: a test run
    started in the background (`cmd &` in a script) inherits SIGINT ignored, and a Python child
    then never raises KeyboardInterrupt. A handled signal is reset to its default at exec, so it is
    handled here around the fork (a preexec_fn would run Python in a forked threaded process)."""
    import signal
    import subprocess

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(argv, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


class BackgroundLoad:
    """`clients` asyncio clients (`_client(index)`, a subclass's) running on a thread of their own
    until the `with` block ends; leaving it fails if one has not returned within `join_timeout` s."""

    def __init__(self, clients: int, join_timeout: float):
        import threading

        self.clients_count, self.join_timeout = clients, join_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="load", daemon=True)

    async def _client(self, index: int) -> None:
        raise NotImplementedError

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.clients_count)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.join_timeout)
        assert not self._thread.is_alive(), "a load client never returned"


def wait_for_idle(server, timeout: float = 60) -> None:
    """Until no request is decoding or waiting (received, in its stages, or being admitted)."""
    start = time.monotonic()
    while metric(server, "blip2_active_sequences") != 0 or metric(server, "blip2_waiting_requests") != 0:
        assert time.monotonic() - start < timeout, "the engine never went idle"
        time.sleep(0.005)


# ---- transformers, the reference ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def reference_model(ckpt: str):
    """(Blip2ForConditionalGeneration, processor) of a checkpoint, loaded once per session."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration.from_pretrained(ckpt).eval(), AutoProcessor.from_pretrained(ckpt)


def pil(seed: int):
    from PIL import Image

    return Image.open(io.BytesIO(random_image(seed))).convert("RGB")


def strip_after_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def reference(ckpt, image_seed: int, prompt: str, checkpoint_config: bool = False, **controls) -> tuple[list[int], str]:
    """transformers' generate() on the same weights for random_image(image_seed) and `prompt`:
    (new token ids up to EOS, their text). The one reference every parity test compares with.

    OPT without a prompt: pixel values alone (generate() adds the image tokens and BOS). T5: the
    processor's encoding of the prompt, "" included (transformers 5 cannot caption a T5 checkpoint
    without input_ids); its new ids follow the decoder start token; with more decoder than
    encoder layers transformers' own cache fails, so that config decodes without it.
    checkpoint_config: decode with the checkpoint's generation_config.json under `controls`, as
    the server does (transformers 5's BLIP-2 generate() otherwise hands its language model the
    global defaults).
    """
    import copy

    import torch

    model, processor = reference_model(str(ckpt))
    text = model.config.text_config
    encoder_decoder = text.is_encoder_decoder
    if prompt or encoder_decoder:
        inputs = processor(images=pil(image_seed), text=prompt, return_tensors="pt")
        start = 1 if encoder_decoder else inputs["input_ids"].shape[1]
    else:
        inputs = {"pixel_values": processor(images=pil(image_seed), return_tensors="pt")["pixel_values"]}
        start = model.config.num_query_tokens + 1  # generate() returns the image placeholders and BOS too
    if encoder_decoder and text.num_decoder_layers != text.num_layers:
        controls["use_cache"] = False
    controls.pop("seed", None)  # sampling draws from torch's generator there, from numpy's here
    if checkpoint_config:
        config = copy.deepcopy(model.generation_config)
        for name, value in controls.items():
            setattr(config, name, value)
        controls = {"generation_config": config}
    with torch.no_grad():
        out = model.generate(**inputs, **controls)
    ids = strip_after_eos(out[0, start:].tolist(), model.generation_config.eos_token_id)
    return ids, processor.tokenizer.decode(ids, skip_special_tokens=True)


# ---- the served tiny model ---------------------------------------------------------------------------
class Served(NamedTuple):
    """A checkpoint's export served by a running tritonserver, and a client of it."""

    checkpoint: Path
    server: object  # blip2_triton.server.TritonServer
    client: object  # blip2_triton.client.Blip2Client


@pytest.fixture(scope="session")
def served(exported, tmp_path_factory):
    """tiny-opt on one tritonserver for the session: the client and CLI tests share it."""
    from blip2_triton.client import Blip2Client
    from blip2_triton.server import TritonServer
    from blip2_triton.serving.step_gate import STEP_GATE_ENV

    ckpt, repo, _ = exported("tiny-opt")
    log = tmp_path_factory.mktemp("served") / "tritonserver.log"
    with TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None, log_file=log,
                      env={STEP_GATE_ENV: "1"}) as server, \
            Blip2Client(server.grpc_url, timeout=60) as client:
        yield Served(ckpt, server, client)


@pytest.fixture
def client(served):
    return served.client


@pytest.fixture
def gate(served):
    """The served engine's step gate (serving/step_gate.py), closed once the engine is idle (an
    earlier test's request still on its way would take the calls this test allows): the test lets
    each language-model call through (allow, release_until); open again afterwards."""
    from blip2_triton.serving.step_gate import StepGateControl

    wait_for_idle(served.server)
    with StepGateControl(served.server.runtime_dir) as control:
        yield control
