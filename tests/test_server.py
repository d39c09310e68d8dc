"""The real tritonserver over gRPC and HTTP: answers equal transformers, streaming, concurrency,
bad input, cancellation, health and metrics. No mocks: every test talks to a live server."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import time
import urllib.request

import numpy as np
import pytest

from blip2_triton.client import Blip2Client, InvalidArgumentError
from blip2_triton.server.launcher import TritonServer
from blip2_triton.serving.step_gate import STEP_GATE_ENV

from .conftest import Served, http_generate, metric, random_image, reference, wait_for_active

pytestmark = pytest.mark.server
MAX_NEW = 10
SERVED_PRESETS = ["tiny-opt", "tiny-opt-postln"]


@pytest.fixture(scope="module", params=SERVED_PRESETS)
def served(request, exported, tmp_path_factory):
    ckpt, repo, _ = exported(request.param)
    log = tmp_path_factory.mktemp("logs") / f"{request.param}.log"
    with TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None, log_file=log,
                      env={STEP_GATE_ENV: "1"}) as server:  # the `gate` fixture holds its engine
        with Blip2Client(server.grpc_url, timeout=60) as client:
            yield Served(ckpt, server, client)


def reference_text(ckpt, image_seed: int, prompt: str) -> str:
    return reference(ckpt, image_seed, prompt, max_new_tokens=MAX_NEW)[1]


@pytest.mark.parametrize("prompt", ["", "a photo of", "Question: what color is the circle? Answer:"])
def test_text_equals_transformers(served, prompt):
    ckpt, _, client = served
    result = client.generate(random_image(7), prompt, max_new_tokens=MAX_NEW)
    assert result.text == reference_text(ckpt, 7, prompt)
    assert result.token_ids


def test_ask_uses_the_vqa_format(served):
    ckpt, _, client = served
    assert client.ask(random_image(8), "what color is the circle?", max_new_tokens=MAX_NEW).text == \
        reference_text(ckpt, 8, "Question: what color is the circle? Answer:")


def test_stream_pieces_concatenate_to_the_one_shot_text(served):
    _, _, client = served
    whole = client.generate(random_image(9), "a photo of", max_new_tokens=MAX_NEW)
    pieces = list(client.stream(random_image(9), "a photo of", max_new_tokens=MAX_NEW))
    assert len(pieces) > 1
    assert "".join(pieces) == whole.text


def test_concurrent_requests_each_get_their_own_answer(served):
    _, _, client = served
    prompts = ["", "a photo of", "Question: how many squares are there? Answer:", "this is"]
    jobs = [(seed, prompts[seed % len(prompts)]) for seed in range(10)]
    alone = {job: client.generate(random_image(job[0]), job[1], max_new_tokens=MAX_NEW).text for job in jobs}
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: client.generate(random_image(job[0]), job[1], max_new_tokens=MAX_NEW).text, jobs))
    assert together == [alone[job] for job in jobs]
    assert len(set(together)) > 1


def test_batch_returns_results_in_input_order(served):
    _, _, client = served
    images = [random_image(s) for s in (11, 12, 13)]
    expected = [client.caption(i, max_new_tokens=MAX_NEW).text for i in images]
    assert [r.text for r in client.batch(images, max_new_tokens=MAX_NEW)] == expected


def _huge_png() -> bytes:
    """A valid PNG header claiming 20000x20000 pixels (400 MP): must be refused before decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


BAD_REQUESTS = [
    ("empty image", dict(image=b""), "image: empty"),
    ("corrupt image", dict(image=b"\x89PNG\r\n\x1a\n garbage"), "image: cannot decode"),
    ("not an image", dict(image=b"%PDF-1.4 not an image"), "image: cannot decode"),
    ("huge image", dict(image=_huge_png()), "pixels, more than"),
    ("prompt too long", dict(prompt="circle " * 400), "context"),
    ("max_new_tokens 0", dict(max_new_tokens=0), "max_new_tokens"),
    ("min > max", dict(min_new_tokens=9, max_new_tokens=3), "min_new_tokens"),
    ("negative top_k", dict(top_k=-1, do_sample=True), "top_k"),
    ("top_p above 1", dict(top_p=1.5, do_sample=True), "top_p"),
    ("zero temperature", dict(temperature=0.0, do_sample=True), "temperature"),
    ("zero beams", dict(num_beams=0), "num_beams"),
    ("room for the answer", dict(max_new_tokens=100000), "max_new_tokens"),
]


@pytest.mark.parametrize("name,request_kwargs,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(served, name, request_kwargs, message):
    _, _, client = served
    kwargs = dict(request_kwargs)
    image = kwargs.pop("image", random_image(1))
    prompt = kwargs.pop("prompt", "")
    with pytest.raises(InvalidArgumentError, match=message) as info:
        client.generate(image, prompt, **kwargs)
    assert "Traceback" not in str(info.value)
    assert client.caption(random_image(2), max_new_tokens=3).token_ids


def _tensors(inputs: dict[str, tuple[str, np.ndarray]]) -> list:
    """name -> (Triton dtype, value) as tritonclient gRPC inputs."""
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, (dtype, value) in inputs.items():
        tensors.append(grpcclient.InferInput(name, list(value.shape), dtype))
        tensors[-1].set_data_from_numpy(value)
    return tensors


def _raw_request(server, inputs: dict[str, tuple[str, np.ndarray]], timeout: float = 60) -> list:
    """One `blip2` request over tritonclient's own gRPC stream, no Blip2Client in between.

    -> every response in order until Triton flags the request complete: InferResult objects, or
    the error (an InferenceServerException) that ends it.
    """
    import queue

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put(error if error is not None else result))
    try:
        client.async_stream_infer("blip2", _tensors(inputs), enable_empty_final_response=True)
        responses = []
        while True:
            item = got.get(timeout=timeout)
            responses.append(item)
            if isinstance(item, Exception) or item.get_response().parameters["triton_final_response"].bool_param:
                break
        time.sleep(0.2)  # anything sent after the final flag would show up here
        while not got.empty():
            responses.append(got.get())
        return responses
    finally:
        client.stop_stream()
        client.close()


def _inputs(image: bytes, prompt: str = "", **values) -> dict[str, tuple[str, np.ndarray]]:
    from blip2_triton import api

    triton = {"bytes": "BYTES", "bool": "BOOL", "int32": "INT32", "int64": "INT64", "float32": "FP32"}
    dtypes = {t.name: t.dtype for t in api.PUBLIC_INPUTS}
    inputs = {"image": ("BYTES", np.array([[image]], dtype=object)),
              "prompt": ("BYTES", np.array([[prompt.encode()]], dtype=object))}
    for name, value in values.items():
        inputs[name] = (triton[dtypes[name]], np.array([[value]], dtype=np.dtype(dtypes[name])))
    return inputs


def _text(result) -> str:
    return result.as_numpy("text").reshape(-1)[0].decode()


def test_stream_false_gives_exactly_one_response_and_stream_true_pieces(served):
    _, server, client = served
    image = random_image(9)
    whole = client.generate(image, "a photo of", max_new_tokens=MAX_NEW)
    for stream in (None, False):
        values = {"max_new_tokens": MAX_NEW} if stream is None else {"max_new_tokens": MAX_NEW, "stream": stream}
        responses = _raw_request(server, _inputs(image, "a photo of", **values))
        assert len(responses) == 1, f"stream={stream}: {len(responses)} responses"
        (only,) = responses
        assert _text(only) == whole.text
        assert only.as_numpy("token_ids").reshape(-1).tolist() == whole.token_ids
        assert only.as_numpy("final").reshape(-1).tolist() == [True]
    pieces = _raw_request(server, _inputs(image, "a photo of", max_new_tokens=MAX_NEW, stream=True))
    pieces = [p for p in pieces if p.get_response().outputs]  # not the empty final-flag response, if any
    assert len(pieces) > 1
    assert "".join(_text(p) for p in pieces) == whole.text
    assert [t for p in pieces for t in p.as_numpy("token_ids").reshape(-1).tolist()] == whole.token_ids
    assert [bool(p.as_numpy("final").reshape(-1)[0]) for p in pieces] == [False] * (len(pieces) - 1) + [True]


_PNG = random_image(1)
WRONG_INPUTS = [
    ("image as INT32", {"image": ("INT32", np.array([[1]], np.int32))}, "image"),
    ("image as FP32", {"image": ("FP32", np.array([[1.0]], np.float32))}, "image"),
    ("image shape [1, 2]", {"image": ("BYTES", np.array([[_PNG, _PNG]], dtype=object))}, "image"),
    ("two images in one request", {"image": ("BYTES", np.array([[_PNG], [_PNG]], dtype=object)), "prompt": None}, "image"),
    ("no image", {"image": None}, "image"),
    ("prompt as INT32", {"prompt": ("INT32", np.array([[7]], np.int32))}, "prompt"),
    ("prompt shape [1, 2]", {"prompt": ("BYTES", np.array([[b"a", b"b"]], dtype=object))}, "prompt"),
    ("stream as INT32", {"stream": ("INT32", np.array([[1]], np.int32))}, "stream"),
    ("max_new_tokens as FP32", {"max_new_tokens": ("FP32", np.array([[3.0]], np.float32))}, "max_new_tokens"),
    ("max_new_tokens shape [1, 2]", {"max_new_tokens": ("INT32", np.array([[3, 4]], np.int32))}, "max_new_tokens"),
]


@pytest.mark.parametrize("name,change,tensor", WRONG_INPUTS, ids=[w[0] for w in WRONG_INPUTS])
def test_wrong_dtype_or_shape_is_invalid_argument_naming_the_input(served, name, change, tensor):
    import re

    from blip2_triton.client.errors import from_triton

    _, server, client = served
    inputs = {k: v for k, v in {**_inputs(_PNG, "a photo of"), **change}.items() if v is not None}
    responses = _raw_request(server, inputs)
    assert len(responses) == 1 and isinstance(responses[0], Exception), responses
    error = from_triton(responses[0])
    assert isinstance(error, InvalidArgumentError), f"{type(error).__name__}: {error}"
    assert re.search(rf"\b{tensor}\b", str(error)), str(error)
    assert "Traceback" not in str(error)
    assert client.caption(random_image(2), max_new_tokens=3).token_ids  # the next request is served


STAGES = ("preprocess", "vision_encoder", "qformer")


def _stage_counts(server) -> dict[str, tuple[int, int, int]]:
    """Triton's statistics per stateless model: (inferences, executions, failed requests)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        counts = {}
        for model in STAGES:
            stats = client.get_inference_statistics(model_name=model, as_json=True)["model_stats"][0]
            failed = int(stats.get("inference_stats", {}).get("fail", {}).get("count", 0))
            counts[model] = (int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)), failed)
        return counts
    finally:
        client.close()


def test_bad_controls_are_refused_before_any_stage_runs(served):
    """No image decoding, tokenization or graph for a request whose controls are wrong whatever
    its prompt: the stages' Triton statistics do not move; they do for the next, good request."""
    _, server, client = served
    before = _stage_counts(server)
    for controls in ({"max_new_tokens": 0}, {"top_p": 1.5, "do_sample": True}, {"num_beams": 0},
                     {"min_new_tokens": 9, "max_new_tokens": 3}, {"max_new_tokens": 100000}):
        with pytest.raises(InvalidArgumentError):
            client.generate(random_image(1), "a photo of", **controls)
    assert _stage_counts(server) == before
    assert client.caption(random_image(1502), max_new_tokens=3).token_ids  # a picture not cached yet
    deadline = time.time() + 10
    while (after := _stage_counts(server)) == before and time.time() < deadline:
        time.sleep(0.05)
    assert all(after[m][0] == before[m][0] + 1 and after[m][2] == before[m][2] for m in STAGES), (before, after)


def _photo(seed: int, size=(1536, 2048)) -> bytes:
    """A 3-megapixel JPEG: ~10 ms to decode and resize, so requests sent together queue behind it."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size[0], 0:size[1]]
    pixels = np.stack([(x * rng.uniform(0.05, 0.2) + y * rng.uniform(0.05, 0.2)) % 256] * 3, axis=-1)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_concurrent_requests_are_batched_by_the_stateless_models(served):
    """16 requests at once run as fewer executions than inferences in preprocess, vision_encoder
    and qformer. No queue delay is configured (repository.QUEUE_DELAY_US = 0): requests that
    arrive while an instance is busy form its next batch. So that this does not depend on timing
    (under load, small requests a little apart ran one by one), the images take preprocess
    milliseconds each, and the test holds the repository's compute lock, which every onnxruntime
    run takes, until all 16 have been preprocessed: the vision encoder's first run waits for it
    with the other requests queued behind, and the Q-Former then receives them as batches."""
    from blip2_triton.serving.compute_lock import ComputeLock

    _, server, client = served
    n = 16
    before = _stage_counts(server)
    with cf.ThreadPoolExecutor(1) as pool:
        with ComputeLock.for_repository(server.model_repository, server.runtime_dir):
            answers = pool.submit(client.batch, [_photo(seed) for seed in range(n)], max_new_tokens=2)
            deadline = time.time() + 60
            while _stage_counts(server)["preprocess"][0] < before["preprocess"][0] + n:
                assert time.time() < deadline, "preprocess never finished the 16 requests"
                time.sleep(0.02)
            time.sleep(0.5)  # preprocess's answers reach blip2, whose vision calls queue
        results = answers.result(timeout=60)
    assert len(results) == n and all(r.token_ids for r in results)
    after = _stage_counts(server)
    for model in STAGES:
        inferences, executions = after[model][0] - before[model][0], after[model][1] - before[model][1]
        assert inferences == n, (model, inferences)
        assert executions < inferences, f"{model}: {executions} executions for {inferences} inferences"
    # Held back by the lock, the vision encoder's requests queue: one run, then batches.
    vision = after["vision_encoder"][1] - before["vision_encoder"][1]
    assert vision <= 3, f"vision_encoder: {vision} executions for {n} requests queued together"


LONG = 110  # new tokens a cancelled request asks for (the tiny models hold 128 positions)


def _long_stream_inputs() -> dict[str, tuple[str, np.ndarray]]:
    return _inputs(random_image(3), stream=True, max_new_tokens=LONG, min_new_tokens=LONG)


def _check_freed(server, gate, client) -> None:
    """`client` starts a streamed LONG-token generation and disconnects while it runs; the
    sequence must end long before LONG tokens.

    The engine's step gate lets the prefill through, then holds the engine while the client
    disconnects; held, the engine still drops the sequence once Triton marks it cancelled, so not
    one more token is decoded.
    """
    tokens_before = metric(server, "blip2_generated_tokens_total")
    client.start()
    gate.allow(1)  # the prefill: the sequence is active with its first token
    gate.wait_blocked()
    wait_for_active(server, 1)
    client.disconnect()
    wait_for_active(server, 0, timeout=120)
    gate.open()
    generated = metric(server, "blip2_generated_tokens_total") - tokens_before
    assert generated == 1, f"{generated} of {LONG} tokens generated"


class _InProcessClient:
    """A long streamed request on tritonclient's gRPC stream in this process, ended by closing the
    stream with its requests cancelled (stop_stream(cancel_requests=True))."""

    def __init__(self, server):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(server.grpc_url)

    def start(self) -> None:
        self.client.start_stream(callback=lambda result, error: None)
        self.client.async_stream_infer("blip2", _tensors(_long_stream_inputs()))

    def disconnect(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def test_cancelled_stream_frees_its_slot(served, gate):
    _, server, client = served
    _check_freed(server, gate, _InProcessClient(server))
    assert client.caption(random_image(4), max_new_tokens=3).token_ids


DYING_CLIENT = """
import pickle, sys, time
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient(sys.argv[1])
client.start_stream(callback=lambda result, error: None)
tensors = []
for name, (dtype, value) in pickle.loads(bytes.fromhex(sys.stdin.readline())).items():
    tensors.append(grpcclient.InferInput(name, list(value.shape), dtype))
    tensors[-1].set_data_from_numpy(value)
client.async_stream_infer("blip2", tensors)
time.sleep(600)
"""


class _DyingClient:
    """A client process killed with SIGKILL: it sends no cancellation, its connection just drops."""

    def __init__(self, server):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", DYING_CLIENT, server.grpc_url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def start(self) -> None:
        import pickle

        self.proc.stdin.write(pickle.dumps(_long_stream_inputs()).hex() + "\n")
        self.proc.stdin.flush()

    def disconnect(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL, err


def test_a_client_killed_mid_stream_frees_its_slot(served, gate):
    _, server, client = served
    dying = _DyingClient(server)
    try:
        _check_freed(server, gate, dying)
    finally:
        if dying.proc.poll() is None:
            dying.proc.kill()
            dying.proc.communicate()
    assert client.caption(random_image(4), max_new_tokens=3).token_ids


def test_health_and_metrics(served):
    _, server, client = served
    client.caption(random_image(5), max_new_tokens=4)
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/blip2/ready"):
        with urllib.request.urlopen(f"http://{server.http_url}" + path, timeout=5) as r:
            assert r.status == 200
    assert metric(server, "nv_inference_request_success") >= 1
    assert metric(server, "blip2_generated_tokens_total") >= 4
    assert metric(server, "blip2_time_to_first_token_seconds_count") >= 1
    assert metric(server, "blip2_active_sequences") == 0


def test_http_generate_and_generate_stream(served):
    _, server, client = served
    image = random_image(6)
    expected = client.generate(image, "a photo of", max_new_tokens=MAX_NEW).text
    body = {"image": base64.b64encode(image).decode(), "prompt": "a photo of", "max_new_tokens": MAX_NEW}
    status, text = http_generate(server, "blip2", "generate", body)
    assert status == 200, text
    assert json.loads(text)["text"] == expected
    status, text = http_generate(server, "blip2", "generate_stream", {**body, "stream": True})
    assert status == 200, text
    events = [json.loads(line[len("data:"):]) for line in text.splitlines() if line.startswith("data:")]
    assert len(events) > 1 and "".join(e["text"] for e in events) == expected
    status, text = http_generate(server, "blip2", "generate", {**body, "image": base64.b64encode(b"junk").decode()})
    assert status == 400 and "image" in text
    # The generate endpoints carry the refusal's message, so its reason too.
    from blip2_triton.api import Reason, parse_refusal

    assert parse_refusal(json.loads(text)["error"]).reason is Reason.IMAGE
