"""The OpenAI-compatible front door, driven by the official `openai` package against the real app
(uvicorn on a free port) in front of the real tritonserver: answers equal the `blip2` model's own
for the same request, one-shot and streamed; bad requests get 400s with messages; a client that
disconnects frees its sequence."""
from __future__ import annotations

import base64
import threading
import time

import openai
import pytest

from blip2_triton.client import chat_prompt
from blip2_triton.frontend import chat
from blip2_triton.frontend.app import create_app
from blip2_triton.server.launcher import free_port

from .conftest import metric, random_image, wait_for_active


def _data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def _user(image: bytes | None, text: str | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": _data_url(image)}}] if image is not None else []
    parts += [{"type": "text", "text": text}] if text is not None else []
    return {"role": "user", "content": parts}


# ---- the translation, without a server ----------------------------------------------------------------
def test_turns_become_blip2s_chat_prompt_and_controls_map_to_generate():
    image = random_image(1)
    job = chat.parse({"model": "blip2", "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                      "messages": [_user(image, "how many?"), {"role": "assistant", "content": "two"},
                                   {"role": "user", "content": "what color?"}]}, "blip2")
    assert job.image == image and job.prompt == chat_prompt([("how many?", "two")], "what color?")
    assert job.controls == dict(max_new_tokens=7, do_sample=True, temperature=0.5, top_p=0.9, seed=3)
    caption = chat.parse({"model": "blip2", "messages": [_user(image)], "temperature": 0}, "blip2")
    assert caption.prompt == "" and caption.controls == {"do_sample": False}


def test_the_command_line_hands_its_options_to_the_app(monkeypatch):
    from blip2_triton.cli import build_parser
    from blip2_triton.frontend import app

    seen = {}
    monkeypatch.setattr(app, "serve", lambda urls, **options: seen.update(options, urls=urls))
    args = build_parser().parse_args(["openai", "--triton-url", "a:1", "--triton-url", "b:2", "--image-affinity"])
    assert args.func(args) == 0
    assert seen["urls"] == ["a:1", "b:2"] and seen["image_affinity"] is True and seen["allow_remote_images"] is False


# ---- the real front door ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def front_door(served):
    """The app served by uvicorn on a free port, in a thread; -> (openai.OpenAI, base URL)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served.server.grpc_url, timeout=120), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the front door did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/v1"
    yield openai.OpenAI(base_url=base, api_key="unused", timeout=120, max_retries=0), base
    server.should_exit = True
    thread.join(30)


@pytest.mark.server
@pytest.mark.parametrize("history,question", [([], None), ([], "what is this?"), ([("what is this?", "a cat")], "where?")],
                         ids=["caption", "question", "two turns"])
def test_answers_are_the_models_own_one_shot_and_streamed(front_door, served, history, question):
    api_client, _ = front_door
    image = random_image(5)
    messages = [_user(image, history[0][0] if history else question)]
    for (_, answer), (next_question, _) in zip(history, [*history[1:], (question, None)]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": next_question}]
    prompt = chat_prompt(history, question) if question else ""
    own = served.client.generate(image, prompt, max_new_tokens=12)

    reply = api_client.chat.completions.create(model="blip2", messages=messages, max_tokens=12)
    (choice,) = reply.choices
    assert choice.message.content == own.text and choice.message.role == "assistant"
    assert reply.usage.completion_tokens == len(own.token_ids)
    assert reply.usage.prompt_tokens == own.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason == ("length" if len(own.token_ids) == 12 else "stop")

    chunks = list(api_client.chat.completions.create(model="blip2", messages=messages, max_tokens=12, stream=True,
                                                     stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == own.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == len(own.token_ids) and not chunks[-1].choices


@pytest.mark.server
def test_sampling_controls_and_seed_reach_the_model(front_door, served):
    api_client, _ = front_door
    image = random_image(6)
    own = served.client.generate(image, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, seed=11)
    reply = api_client.chat.completions.create(model="blip2", messages=[_user(image)], max_completion_tokens=8,
                                               temperature=0.7, top_p=0.9, seed=11)
    assert reply.choices[0].message.content == own.text


@pytest.mark.server
def test_models_are_listed(front_door):
    api_client, _ = front_door
    assert [m.id for m in api_client.models.list().data] == ["blip2"]
    assert api_client.models.retrieve("blip2").owned_by == "blip2-triton"


IMAGE = random_image(2)
BAD = {
    "two choices": (dict(n=2), "n", "'n' must be 1"),
    "tools": (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "not supported"),
    "logprobs": (dict(logprobs=True), "logprobs", "not supported"),
    "stop": (dict(stop=["."]), "stop", "not supported"),
    "unknown argument": (dict(extra_body={"beams": 3}), "beams", "Unrecognized request argument"),
    "zero tokens": (dict(max_tokens=0), "max_tokens", "integer >= 1"),
    "hot": (dict(temperature=3), "temperature", "[0, 2]"),
    "system prompt": (dict(messages=[{"role": "system", "content": "be brief"}, _user(IMAGE, "hi")]),
                      "messages[0].role", "not supported"),
    "no image": (dict(messages=[{"role": "user", "content": "hi"}]), "messages", "exactly one image"),
    "two images": (dict(messages=[_user(IMAGE), {"role": "assistant", "content": "a"}, _user(IMAGE)]),
                   "messages", "exactly one image"),
    "ends on assistant": (dict(messages=[_user(IMAGE), {"role": "assistant", "content": "a"}]),
                          "messages[1].role", "must be the user's"),
    "http image": (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}]),
                   "messages[0].content[0].image_url.url", "refused by this server"),
    "bad base64": (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]),
                   "messages[0].content[0].image_url.url", "base64 is invalid"),
    # refused by the model itself, with its reason as OpenAI's code
    "not an image": (dict(messages=[_user(b"junk")]), None, "invalid argument [image]"),
    "too long": (dict(messages=[_user(IMAGE, "why " * 300)]), None, "invalid argument [context_exceeded]"),
}


@pytest.mark.server
@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_style_400s(front_door, case):
    api_client, _ = front_door
    arguments, param, words = BAD[case]
    arguments = {"model": "blip2", "messages": [_user(IMAGE)], **arguments}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            api_client.chat.completions.create(**arguments, stream=stream)
        error = info.value.body
        assert info.value.status_code == 400 and words in error["message"] and error["param"] == param, error
        assert error["code"]
    if case == "too long":
        assert error["code"] == "context_length_exceeded"


@pytest.mark.server
def test_unknown_model_is_404(front_door):
    api_client, _ = front_door
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api_client.chat.completions.create(model="gpt-4o", messages=[_user(IMAGE)])


LONG = 100  # tokens; tiny-opt's random weights do not stop early on the image below


@pytest.mark.server
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "one-shot"])
def test_a_client_that_disconnects_frees_its_sequence(front_door, served, gate, stream):
    """The engine's step gate lets the prefill through and then holds decoding: the HTTP client
    goes away after the first chunk (streamed) or while it waits for the answer (one-shot); the
    sequence is dropped with no token more."""
    import http.client
    import json

    _, base = front_door
    server = served.server
    image = random_image(3)
    body = {"model": "blip2", "messages": [_user(image)], "max_tokens": LONG, "stream": stream}
    before = metric(server, "blip2_generated_tokens_total")
    host, port = base.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60 if stream else 2.0)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        gate.allow(1)  # the prefill: the sequence is active with its first token
        gate.wait_blocked()
        wait_for_active(server, 1)
        if stream:
            response = connection.getresponse()
            assert response.status == 200
            assert response.readline().startswith(b"data: ")  # the first event
            response.close()  # the socket stays open while the response holds it
        else:  # decoding held: the answer cannot come; the client gives up after 2 s
            with pytest.raises(TimeoutError):
                connection.getresponse()
    finally:
        connection.close()
    # Still held at the gate, the engine drops the sequence once the front door has cancelled
    # its call and Triton has marked it: not one more token.
    wait_for_active(server, 0, timeout=120)
    gate.open()
    generated = metric(server, "blip2_generated_tokens_total") - before
    assert generated == 1, f"{generated} of {LONG} tokens generated"
    # the same request runs to LONG tokens when nobody goes away
    assert len(served.client.generate(image, max_new_tokens=LONG).token_ids) == LONG
