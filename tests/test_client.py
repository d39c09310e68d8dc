"""The client against one real tritonserver on the tiny model: every workflow, every image type, the
generation controls served token for token as transformers' generate() decodes them, rejected
controls and typed errors (wrong URL, timeouts, cancellation); the error mapping's unit tests are
tests/test_client_errors.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import math
import time
from pathlib import Path

import numpy as np
import pytest

from blip2_triton.client import (
    AsyncBlip2Client,
    Blip2Client,
    DeadlineExceededError,
    InvalidArgumentError,
    UnavailableError,
    chat_prompt,
    vqa_prompt,
)
from blip2_triton.client.aio import is_context_overflow
from blip2_triton.server.launcher import TritonServer, free_port

from . import conftest
from .conftest import metric, random_image, wait_for_active

pytestmark = pytest.mark.server
MAX_NEW = 8
LONG = 120  # new tokens: nearly all of the tiny model's 128 positions
PRESET = "tiny-opt"


def reference(ckpt, image_seed: int, prompt: str, **controls) -> tuple[list[int], str]:
    """conftest.reference with this module's default length."""
    return conftest.reference(ckpt, image_seed, prompt, **{"max_new_tokens": MAX_NEW, **controls})


def assert_matches_reference(result, ckpt, image_seed, prompt, **controls):
    ids, text = reference(ckpt, image_seed, prompt, **controls)
    assert result.token_ids == ids
    assert result.text == text


# ---- workflows --------------------------------------------------------------------------------
def test_caption(served, client):
    assert_matches_reference(client.caption(random_image(1), max_new_tokens=MAX_NEW), served.checkpoint, 1, "")


def test_prompted_caption(served, client):
    result = client.caption(random_image(2), "a photo of", max_new_tokens=MAX_NEW)
    assert result.prompt == "a photo of"
    assert_matches_reference(result, served.checkpoint, 2, "a photo of")


def test_ask_uses_the_vqa_prompt(served, client):
    result = client.ask(random_image(3), " what is it? ", max_new_tokens=MAX_NEW)
    assert result.prompt == "Question: what is it? Answer:" == vqa_prompt("what is it?")
    assert_matches_reference(result, served.checkpoint, 3, "Question: what is it? Answer:")


def test_chat_builds_the_documented_prompt(served, client):
    history = [("what is it?", "a red circle"), ("where is it?", "on the left")]
    result = client.chat(random_image(4), history, "what color is it?", max_new_tokens=MAX_NEW)
    expected = ("Question: what is it? Answer: a red circle. Question: where is it? Answer: on the left. "
                "Question: what color is it? Answer:")
    assert result.prompt == expected == chat_prompt(history, "what color is it?")
    assert result.dropped_turns == 0
    assert_matches_reference(result, served.checkpoint, 4, expected)


LONG_HISTORY = [(f"what is shape number {i} in the picture?", f"it is a big red circle number {i}") for i in range(14)]


@pytest.mark.parametrize("max_new_tokens", [MAX_NEW, 60], ids=["prompt-too-long", "no-room-for-the-answer"])
def test_chat_drops_the_oldest_turns_until_the_prompt_fits(served, client, max_new_tokens):
    question = "what color is it?"
    image = random_image(5)
    result = client.chat(image, LONG_HISTORY, question, max_new_tokens=max_new_tokens)
    dropped = result.dropped_turns
    assert 0 < dropped < len(LONG_HISTORY)
    kept = LONG_HISTORY[dropped:]
    assert result.prompt == chat_prompt(kept, question)  # the newest turns, in order
    assert result.token_ids == client.generate(image, chat_prompt(kept, question), max_new_tokens=max_new_tokens).token_ids
    # ... and no fewer turns had to go: one more turn does not fit.
    with pytest.raises(InvalidArgumentError) as info:
        client.generate(image, chat_prompt(LONG_HISTORY[dropped - 1:], question), max_new_tokens=max_new_tokens)
    assert is_context_overflow(info.value)
    assert_matches_reference(result, served.checkpoint, 5, result.prompt, max_new_tokens=max_new_tokens)


def test_chat_raises_when_the_question_alone_does_not_fit(client):
    with pytest.raises(InvalidArgumentError, match="context"):
        client.chat(random_image(5), LONG_HISTORY[:3], "circle " * 300, max_new_tokens=MAX_NEW)


def test_chat_stream_equals_chat(client):
    image = random_image(6)
    whole = client.chat(image, LONG_HISTORY, "what is it?", max_new_tokens=MAX_NEW)
    pieces = list(client.chat_stream(image, LONG_HISTORY, "what is it?", max_new_tokens=MAX_NEW))
    assert len(pieces) > 1 and "".join(pieces) == whole.text


def test_batch_keeps_input_order_with_mixed_prompts(served, client):
    seeds = [11, 12, 13, 14]
    prompts = ["", "a photo of", vqa_prompt("how many circles are there?"), "there is"]
    results = client.batch([random_image(s) for s in seeds], prompts, max_new_tokens=MAX_NEW)
    assert [r.prompt for r in results] == prompts
    for seed, prompt, result in zip(seeds, prompts, results):
        assert_matches_reference(result, served.checkpoint, seed, prompt)
    assert len({r.text for r in results}) > 1


def test_batch_one_image_many_prompts_and_mismatches(client):
    image = random_image(15)
    prompts = ["a photo of", "there is"]
    results = client.batch(image, prompts, max_new_tokens=MAX_NEW)
    assert [r.text for r in results] == [client.caption(image, p, max_new_tokens=MAX_NEW).text for p in prompts]
    with pytest.raises(InvalidArgumentError, match="2 images but 3 prompts"):
        client.batch([image, image], ["a", "b", "c"])


def test_sync_stream_pieces_concatenate_to_the_answer(client):
    whole = client.caption(random_image(16), "a photo of", max_new_tokens=MAX_NEW)
    pieces = list(client.stream(random_image(16), "a photo of", max_new_tokens=MAX_NEW))
    assert len(pieces) > 1 and "".join(pieces) == whole.text


def test_async_workflows_and_stream(served, client):
    url = served.server.grpc_url

    async def main():
        async with AsyncBlip2Client(url, timeout=60) as c:
            assert await c.is_ready()
            pieces = [p async for p in c.stream(random_image(17), max_new_tokens=MAX_NEW)]
            results = await asyncio.gather(
                c.caption(random_image(17), max_new_tokens=MAX_NEW),
                c.ask(random_image(17), "what is it?", max_new_tokens=MAX_NEW),
                c.chat(random_image(17), [("what is it?", "a square")], "where?", max_new_tokens=MAX_NEW),
                c.batch([random_image(17)], "a photo of", max_new_tokens=MAX_NEW),
            )
            return pieces, results

    pieces, (caption, ask, chat, batch) = asyncio.run(main())
    assert "".join(pieces) == caption.text and len(pieces) > 1
    assert caption == client.caption(random_image(17), max_new_tokens=MAX_NEW)
    assert ask == client.ask(random_image(17), "what is it?", max_new_tokens=MAX_NEW)
    assert chat == client.chat(random_image(17), [("what is it?", "a square")], "where?", max_new_tokens=MAX_NEW)
    assert batch == client.batch([random_image(17)], "a photo of", max_new_tokens=MAX_NEW)


def test_every_call_shares_one_stream_a_cancelled_one_too(served):
    """tritonserver keeps memory for every gRPC stream ever opened (see client/aio.py): calls one
    after another reuse one stream, a refusal included (its error is the request's final
    response), and so does a call that ends early: it is stopped on its own stream, never by
    cancelling the stream (which can crash tritonserver 2.51), and the stream serves the next call
    once the stopped request's last response is read."""
    image = random_image(18)

    async def main():
        async with AsyncBlip2Client(served.server.grpc_url, timeout=60) as c:
            first = await c.caption(image, max_new_tokens=MAX_NEW)
            with pytest.raises(InvalidArgumentError):
                await c.caption(b"not an image", max_new_tokens=MAX_NEW)
            with pytest.raises(InvalidArgumentError):
                await c.generate(image, temperature=-1.0, do_sample=True)
            again = await c.caption(image, max_new_tokens=MAX_NEW)
            shared = c.streams_opened
            for _ in range(3):
                async with contextlib.aclosing(c.stream(image, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)) as it:
                    async for _ in it:
                        break  # the call ends early (closed now): its request is stopped on the server
                while c._winding_down:  # its wind-down (private: the test waits for it to reuse the stream)
                    await asyncio.sleep(0.01)
            after_cancel = await c.caption(image, max_new_tokens=MAX_NEW)
            return first, again, shared, c.streams_opened, after_cancel

    first, again, shared, opened, after_cancel = asyncio.run(main())
    assert first == again == after_cancel
    assert shared == 1, f"{shared} streams for four calls made one after another"
    assert opened == 1, f"{opened} streams: a cancelled call's stream was ended, not kept"
    wait_for_active(served.server, 0)


def test_async_chat_stream_equals_chat_and_closes_early(served):
    image, question = random_image(6), "what is it?"

    async def main():
        async with AsyncBlip2Client(served.server.grpc_url, timeout=60) as c:
            pieces = [p async for p in c.chat_stream(image, LONG_HISTORY, question, max_new_tokens=MAX_NEW)]
            whole = await c.chat(image, LONG_HISTORY, question, max_new_tokens=MAX_NEW)
            stream = c.chat_stream(image, [], question, max_new_tokens=MAX_NEW)
            first = await stream.__anext__()
            await stream.aclose()  # closed after one piece: the call ends, the client goes on
            return pieces, whole, first, await c.chat(image, [], question, max_new_tokens=MAX_NEW)

    pieces, whole, first, short = asyncio.run(main())
    assert whole.dropped_turns > 0  # the streamed prompt had to drop turns too
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    assert_matches_reference(whole, served.checkpoint, 6, whole.prompt)
    assert short.text.startswith(first) and short.text != first


def _image_as(kind: str, seed: int, tmp_path: Path):
    from PIL import Image

    data = random_image(seed)
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if kind in ("str path", "Path"):
        path = tmp_path / "image.png"
        path.write_bytes(data)
        return str(path) if kind == "str path" else path
    return {
        "bytes": lambda: data,
        "bytearray": lambda: bytearray(data),
        "memoryview": lambda: memoryview(data),
        "PIL": lambda: Image.open(io.BytesIO(data)),
        "numpy HxWx3": lambda: array,
        "numpy HxWx4": lambda: np.dstack([array, np.full(array.shape[:2], 255, np.uint8)]),
    }[kind]()


@pytest.mark.parametrize("kind", ["str path", "Path", "bytes", "bytearray", "memoryview", "PIL", "numpy HxWx3",
                                  "numpy HxWx4"])
def test_every_image_type_gives_the_same_answer(served, client, kind, tmp_path):
    assert_matches_reference(client.caption(_image_as(kind, 18, tmp_path), max_new_tokens=MAX_NEW), served.checkpoint, 18, "")


def test_grayscale_arrays_are_served(client):
    gray = np.random.RandomState(0).randint(0, 256, (30, 40), dtype=np.uint8)
    assert client.caption(gray, max_new_tokens=3).token_ids
    assert client.caption(gray[:, :, None], max_new_tokens=3) == client.caption(gray, max_new_tokens=3)


@pytest.mark.parametrize("image,message", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 2), np.uint8), "uint8"),
    (12345, "unsupported type int"),
    ("/no/such/image.png", "cannot read"),
], ids=["float array", "two channels", "int", "missing file"])
def test_unusable_images_are_invalid_arguments_before_sending(client, image, message):
    with pytest.raises(InvalidArgumentError, match=message):
        client.caption(image)


# ---- generation controls, served faithfully ---------------------------------------------------
# Random tiny weights never choose EOS on their own; a repetition penalty below 1 boosts the ids
# already seen, BOS/EOS (id 2) among them, so these cases end on EOS at different lengths and
# length_penalty, early_stopping and min_new_tokens change the answer (checked below).
CONTROL_CASES = {
    "greedy": (1, "", {}),
    "greedy, stops on EOS": (6, "a photo of", dict(repetition_penalty=0.5, max_new_tokens=10)),
    "beam 3": (1, "a photo of", dict(num_beams=3)),
    "beam 3, EOS": (6, "a photo of", dict(num_beams=3, repetition_penalty=0.5, max_new_tokens=10)),
    "beam 3, length_penalty -1": (6, "a photo of", dict(num_beams=3, repetition_penalty=0.5, max_new_tokens=10,
                                                        length_penalty=-1.0)),
    "beam 3, length_penalty 2": (3, "a photo of", dict(num_beams=3, repetition_penalty=0.3, max_new_tokens=10,
                                                       length_penalty=2.0)),
    "beam 3, no EOS": (3, "", dict(num_beams=3, repetition_penalty=0.5, max_new_tokens=10)),
    "beam 3, early_stopping": (3, "", dict(num_beams=3, repetition_penalty=0.5, max_new_tokens=10,
                                           early_stopping=True)),
    "repetition_penalty 1.5": (1, "", dict(repetition_penalty=1.5)),
    "no_repeat_ngram_size 2": (2, "", dict(no_repeat_ngram_size=2, max_new_tokens=12)),
    "min_new_tokens": (6, "a photo of", dict(repetition_penalty=0.5, max_new_tokens=10, min_new_tokens=8)),
    "beam 3, min_new_tokens": (3, "a photo of", dict(num_beams=3, repetition_penalty=0.3, max_new_tokens=10,
                                                     min_new_tokens=8)),
    "beam 3, no_repeat_ngram_size 2": (4, "", dict(num_beams=3, no_repeat_ngram_size=2, max_new_tokens=12)),
    "beam 3, repetition_penalty 1.5": (1, "", dict(num_beams=3, repetition_penalty=1.5, max_new_tokens=10)),
    "beam 3, every control at once": (5, "a photo of", dict(num_beams=3, repetition_penalty=0.3, no_repeat_ngram_size=2,
                                                            min_new_tokens=5, length_penalty=-1.0, max_new_tokens=10)),
}


@pytest.mark.parametrize("case", list(CONTROL_CASES))
def test_deterministic_modes_equal_transformers(served, client, case):
    seed, prompt, controls = CONTROL_CASES[case]
    controls = {"max_new_tokens": MAX_NEW, **controls}
    assert_matches_reference(client.generate(random_image(seed), prompt, **controls), served.checkpoint, seed, prompt, **controls)


def test_the_control_cases_exercise_their_controls(served):
    """Guard against vacuous parity: each varied control changes transformers' own answer here."""
    def ids(case, **override):
        seed, prompt, controls = CONTROL_CASES[case]
        return reference(served.checkpoint, seed, prompt, **{"max_new_tokens": MAX_NEW, **controls, **override})[0]

    eos = 2
    assert ids("greedy, stops on EOS")[-1] == eos and len(ids("greedy, stops on EOS")) < 10
    assert ids("beam 3, EOS") != ids("beam 3, length_penalty -1")
    assert ids("beam 3, length_penalty 2") != ids("beam 3, length_penalty 2", length_penalty=1.0)
    assert ids("beam 3, early_stopping") != ids("beam 3, no EOS")
    assert ids("min_new_tokens") != ids("min_new_tokens", min_new_tokens=0)
    assert ids("beam 3, min_new_tokens") != ids("beam 3, min_new_tokens", min_new_tokens=0)
    assert ids("repetition_penalty 1.5") != ids("greedy")
    assert ids("no_repeat_ngram_size 2") != ids("no_repeat_ngram_size 2", no_repeat_ngram_size=0)
    assert ids("beam 3") != ids("beam 3", num_beams=1)
    assert ids("beam 3, no_repeat_ngram_size 2") != ids("beam 3, no_repeat_ngram_size 2", no_repeat_ngram_size=0)
    assert ids("beam 3, repetition_penalty 1.5") != ids("beam 3, repetition_penalty 1.5", repetition_penalty=1.0)
    every = "beam 3, every control at once"
    assert ids(every)[-1] == eos
    for neutral in (dict(repetition_penalty=1.0), dict(no_repeat_ngram_size=0), dict(min_new_tokens=0),
                    dict(length_penalty=1.0)):
        assert ids(every) != ids(every, **neutral), neutral


# ---- defaults from the checkpoint's generation config ------------------------------------------
# Both served test checkpoints keep transformers' own defaults, so a server ignoring the config
# would pass every test above; this one sets its own. Each value changes transformers' answer on
# these images (checked below), so none can be ignored unnoticed.
CHECKPOINT_DEFAULTS = dict(num_beams=2, max_new_tokens=10, no_repeat_ngram_size=2, repetition_penalty=1.3)
DEFAULTS_CASES = [(6, ""), (12, "a photo of")]


@pytest.fixture(scope="module")
def served_with_own_defaults(tiny_checkpoints, tmp_path_factory):
    """(checkpoint, running server) of tiny-opt whose generation_config.json sets CHECKPOINT_DEFAULTS."""
    import json
    import shutil

    from blip2_triton.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("own-defaults")
    ckpt = Path(shutil.copytree(tiny_checkpoints(PRESET), root / "checkpoint"))
    config_file = ckpt / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **CHECKPOINT_DEFAULTS}))
    export_checkpoint(ckpt, root / "repo", progress=False)
    with TritonServer(root / "repo", grpc_port=None, http_port=None, metrics_port=None,
                      log_file=root / "tritonserver.log") as server:
        yield conftest.Served(ckpt, server, None)


def reference_with_checkpoint_config(ckpt, image_seed: int, prompt: str, **overrides) -> list[int]:
    """transformers' generate() with the checkpoint's generation config (plus `overrides`): new ids."""
    return conftest.reference(ckpt, image_seed, prompt, checkpoint_config=True, **overrides)[0]


@pytest.mark.parametrize("seed,prompt", DEFAULTS_CASES)
def test_absent_controls_take_the_checkpoint_generation_config(served_with_own_defaults, seed, prompt):
    ckpt, server, _ = served_with_own_defaults
    expected = reference_with_checkpoint_config(ckpt, seed, prompt)
    assert len(expected) == CHECKPOINT_DEFAULTS["max_new_tokens"]
    assert expected != reference(ckpt, seed, prompt, max_new_tokens=20)[0]  # transformers' global defaults
    for name, neutral in [("num_beams", 1), ("no_repeat_ngram_size", 0), ("repetition_penalty", 1.0)]:
        assert reference_with_checkpoint_config(ckpt, seed, prompt, **{name: neutral}) != expected, name
    with Blip2Client(server.grpc_url, timeout=60) as c:
        assert c.generate(random_image(seed), prompt).token_ids == expected
        # a request's own control wins over the checkpoint's; the other defaults stay
        assert c.generate(random_image(seed), prompt, num_beams=1).token_ids == \
            reference_with_checkpoint_config(ckpt, seed, prompt, num_beams=1)


def test_sampling_is_reproducible_with_a_seed(client):
    image = random_image(20)
    sample = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=MAX_NEW)
    first = client.generate(image, "a photo of", seed=7, **sample)
    assert client.generate(image, "a photo of", seed=7, **sample) == first
    others = {tuple(client.generate(image, "a photo of", seed=s, **sample).token_ids) for s in range(1, 6)}
    assert len(others | {tuple(first.token_ids)}) > 1  # the seed matters


def test_sampling_with_top_k_1_is_greedy(served, client):
    result = client.generate(random_image(21), "", do_sample=True, top_k=1, seed=3, max_new_tokens=MAX_NEW)
    assert result == client.generate(random_image(21), "", max_new_tokens=MAX_NEW)
    assert_matches_reference(result, served.checkpoint, 21, "")


def test_concurrent_requests_each_get_their_own_result(served, client):
    """Beam search, greedy and sampled requests decoded together in the continuous batch."""
    jobs = [(seed, prompt, {"max_new_tokens": MAX_NEW, **controls}) for seed, prompt, controls in CONTROL_CASES.values()]
    jobs += [(22 + i, "a photo of", dict(do_sample=True, seed=i, top_k=30, max_new_tokens=MAX_NEW)) for i in range(3)]
    alone = [client.generate(random_image(s), p, **c) for s, p, c in jobs]

    async def together():
        async with AsyncBlip2Client(served.server.grpc_url, timeout=120) as c:
            return await asyncio.gather(*(c.generate(random_image(s), p, **kw) for s, p, kw in jobs))

    for _ in range(2):
        assert asyncio.run(together()) == alone
    for (seed, prompt, controls), result in zip(jobs, alone):
        if not controls.get("do_sample"):
            assert_matches_reference(result, served.checkpoint, seed, prompt, **controls)


# ---- rejected controls ------------------------------------------------------------------------
REJECTED = [
    ("beam search with sampling", dict(num_beams=3, do_sample=True), "num_beams"),
    ("min above max", dict(min_new_tokens=9, max_new_tokens=4), "min_new_tokens"),
    ("zero max_new_tokens", dict(max_new_tokens=0), "max_new_tokens"),
    ("no room to answer", dict(max_new_tokens=500), "max_new_tokens must be <="),
    ("top_p 0", dict(do_sample=True, top_p=0.0), "top_p"),
    ("negative temperature", dict(do_sample=True, temperature=-1.0), "temperature"),
    ("zero repetition_penalty", dict(repetition_penalty=0.0), "repetition_penalty"),
    ("negative no_repeat_ngram_size", dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    ("nan length_penalty", dict(num_beams=2, length_penalty=math.nan), "length_penalty"),
    ("negative top_k", dict(do_sample=True, top_k=-1), "top_k"),
    ("negative seed", dict(do_sample=True, seed=-1), "seed"),
    ("zero beams", dict(num_beams=0), "num_beams"),
    # out of range even where the mode that would read them is off (transformers only warns then)
    ("negative temperature, greedy", dict(do_sample=False, temperature=-1.0), "temperature must be > 0"),
    ("top_p above 1, beam search", dict(num_beams=2, top_p=1.5), r"top_p must be in \(0, 1\]"),
    ("negative top_k, greedy", dict(top_k=-1), "top_k must be >= 0"),
]


@pytest.mark.parametrize("name,controls,message", REJECTED, ids=[r[0] for r in REJECTED])
def test_out_of_range_or_contradictory_controls_are_rejected(client, name, controls, message):
    with pytest.raises(InvalidArgumentError, match=message) as info:
        client.generate(random_image(1), **controls)
    assert info.value.message.count("\n") == 0 and "Traceback" not in info.value.message
    assert client.caption(random_image(1), max_new_tokens=2).token_ids  # still serving


def test_in_range_controls_of_a_mode_that_is_off_are_accepted_and_unused(client):
    greedy = client.generate(random_image(1), max_new_tokens=MAX_NEW)
    assert client.generate(random_image(1), max_new_tokens=MAX_NEW, temperature=0.5, top_k=3, top_p=0.5,
                           length_penalty=2.0, early_stopping=True) == greedy


@pytest.mark.parametrize("controls,message", [
    (dict(max_new_tokens="5"), "max_new_tokens must be an integer"),
    (dict(do_sample=1), "do_sample must be true or false"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(max_new_tokens=2**40), "must fit int32"),
    (dict(beams=3), "unknown generation control 'beams'"),
], ids=["string int", "int bool", "string float", "int32 overflow", "unknown"])
def test_controls_that_cannot_be_encoded_are_rejected_by_the_client(client, controls, message):
    with pytest.raises(InvalidArgumentError, match=message):
        client.generate(random_image(1), **controls)


def test_numpy_scalars_are_accepted_as_controls(client):
    assert client.caption(random_image(1), max_new_tokens=np.int64(3), do_sample=np.bool_(False)) == \
        client.caption(random_image(1), max_new_tokens=3)


# ---- typed errors: real cases -----------------------------------------------------------------
@pytest.mark.parametrize("url", ["127.0.0.1:{free}", "no-such-host.invalid:8001"], ids=["nothing listening", "unknown host"])
def test_unreachable_server_is_unavailable(url):
    url = url.format(free=free_port())
    with Blip2Client(url, timeout=30) as c:
        assert not c.is_ready()
        with pytest.raises(UnavailableError, match=url) as info:
            c.caption(random_image(1))
    assert info.value.status == "UNAVAILABLE" and "\n" not in info.value.message


def test_unknown_model_is_unavailable(served):
    with Blip2Client(served.server.grpc_url, model="no_such_model", timeout=30) as c:
        with pytest.raises(UnavailableError, match="no_such_model"):
            c.caption(random_image(1))


# A call ended while the engine waits at its step gate: held, the engine keeps dropping the active
# sequences Triton has marked cancelled (serving/step_gate.py). A request not yet admitted is asked
# only at its admission, so the server is given SETTLE s to mark it first: Triton usually does
# within ms, but more than a second was seen on the loaded 2-core machine.
SETTLE = 3.0


def _counted(server, action) -> tuple[float, object]:
    """(blip2_generated_tokens_total added while `action()` runs, once the server is idle again;
    what action returned). A dropped sequence's count is published when it is dropped."""
    before = metric(server, "blip2_generated_tokens_total")
    returned = action()
    wait_for_active(server, 0)
    return metric(server, "blip2_generated_tokens_total") - before, returned


def _end_mid_stream(server, gate, end: str) -> tuple[int, int]:
    """Stream LONG tokens; let the prefill and DECODED - 1 steps through the gate, so DECODED tokens
    are decoded and received; then end the call with the engine held at the gate: "cancel" cancels
    the consuming task, "deadline" lets the client's timeout run out. Let calls through one at a
    time until the sequence is gone. -> (tokens received, tokens of a next call on the same client)."""
    decoded = 5

    async def main():
        async with AsyncBlip2Client(server.grpc_url, timeout=None if end == "cancel" else 8.0) as c:
            received = 0

            async def consume():
                nonlocal received
                controls = dict(max_new_tokens=LONG, min_new_tokens=LONG)
                async for piece in c.responses(random_image(3), "", stream=True, **controls):
                    received += len(piece.token_ids)

            task = asyncio.create_task(consume())
            gate.allow(decoded)
            await asyncio.to_thread(gate.wait_blocked)
            deadline = time.monotonic() + 30
            while received < decoded:  # the responses of the tokens decoded so far arrive
                assert time.monotonic() < deadline, f"{received} of {decoded} decoded tokens received"
                await asyncio.sleep(0.01)
            assert received == decoded and not task.done()
            if end == "cancel":
                task.cancel()
                with pytest.raises(asyncio.CancelledError):  # asyncio's own: the caller cancelled
                    await task
            else:
                with pytest.raises(DeadlineExceededError, match="8s"):
                    await task
            # still held at the gate, the engine drops the sequence once Triton marks it cancelled
            await asyncio.to_thread(wait_for_active, server, 0, 120)
            gate.open()
            return received, await _still_serves(c)

    return asyncio.run(main())


async def _still_serves(c: AsyncBlip2Client) -> int:
    """The client whose call ended early answers the next call; -> its number of tokens."""
    result = await c.caption(random_image(4), max_new_tokens=3)
    assert result.token_ids
    return len(result.token_ids)


@pytest.mark.parametrize("end", ["cancel", "deadline"])
def test_a_stream_ended_mid_generation_frees_its_sequence_at_once(served, client, gate, end):
    """A cancelled asyncio task, or a timeout, mid-stream, the engine held at its step gate: the
    server drops the sequence without decoding another token, where running on it would decode
    all LONG."""
    server = served.server
    generated, (received, next_call) = _counted(server, lambda: _end_mid_stream(server, gate, end))
    after = generated - received - next_call
    assert after == 0 < LONG - received, f"{after} tokens decoded after {received} of {LONG}"
    assert client.caption(random_image(4), max_new_tokens=3).token_ids


def test_a_cancelled_one_response_call_is_never_decoded(served, client, gate):
    """Cancelled while its request waits for the engine (held at the gate before its prefill):
    the server drops it, where it would otherwise decode LONG tokens."""
    server = served.server

    def cancel_while_waiting():
        async def main():
            async with AsyncBlip2Client(server.grpc_url, timeout=60) as c:
                task = asyncio.create_task(c.generate(random_image(3), max_new_tokens=LONG, min_new_tokens=LONG))
                taken = await asyncio.to_thread(gate.wait_blocked)  # the request reached the engine
                assert not task.done(), task
                task.cancel()
                with pytest.raises(asyncio.CancelledError):  # asyncio's own, not the client's CancelledError
                    await task
                await asyncio.sleep(SETTLE)
                gate.allow(1)  # its admission, which finds it cancelled
                await asyncio.to_thread(gate.wait_blocked, taken + 1, False)
        asyncio.run(main())

    generated, _ = _counted(server, cancel_while_waiting)
    assert generated == 0
    gate.open()
    assert client.caption(random_image(4), max_new_tokens=3).token_ids


def test_a_tiny_timeout_is_deadline_exceeded(served, client):
    with Blip2Client(served.server.grpc_url, timeout=0.01) as c:
        with pytest.raises(DeadlineExceededError, match="0.01s"):
            c.caption(random_image(1), max_new_tokens=LONG, min_new_tokens=LONG)
    wait_for_active(served.server, 0)
    assert client.caption(random_image(1), max_new_tokens=2).token_ids
