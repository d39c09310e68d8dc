"""Clients over several servers (replicas): least-outstanding choice, readiness, retries.

The choice and the URL checks run without a server. The replica test serves the embedded model
on two real tritonservers on loopback, drives 8 concurrent clients at them, SIGKILLs one server's
whole process group (as a lost machine would go) mid-run and brings it back on the same ports:
no request that had not started is lost, every stream that had produced text gets the clear error,
and load returns to the revived server.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
import urllib.request

import pytest

from blip2_triton.client import AsyncBlip2Client, Blip2Client, InvalidArgumentError, UnavailableError
from blip2_triton.client.errors import Blip2Error
from blip2_triton.client.replicas import Replica, Replicas, parse_urls
from blip2_triton.server.launcher import TritonServer, free_port

from .conftest import BackgroundLoad, metric, random_image


# ---- the choice, without a server ---------------------------------------------------------------------
class _Channel:
    async def close(self) -> None:
        pass


def _replicas(n: int) -> Replicas:
    return Replicas([f"127.0.0.1:{8001 + 10 * i}" for i in range(n)], "blip2", lambda url: _Channel())


def test_urls_are_one_or_several_distinct_addresses():
    assert parse_urls("h:1") == ("h:1",)
    assert parse_urls(["h:1", " h:2 "]) == ("h:1", "h:2")
    for bad in ([], [""], ["h:1", "h:1"], [None]):
        with pytest.raises(InvalidArgumentError):
            parse_urls(bad)


def test_fewest_outstanding_first_ties_in_turn_down_ones_last():
    replicas = _replicas(3)
    a, b, c = replicas.replicas
    assert [replicas.order()[0] for _ in range(6)] == [a, b, c, a, b, c]  # ties: in turn
    with a.attempt(), a.attempt(), b.attempt():
        assert replicas.order()[:2] == [c, b] and (a.outstanding, b.outstanding) == (2, 1)
        replicas.mark_down(c)
        assert replicas.order() == [b, a, c]  # down: tried last, in case its readiness is stale
    assert (a.outstanding, b.outstanding, a.requests) == (0, 0, 2)


def test_image_affinity_breaks_ties_by_image_the_same_in_every_client():
    first, second = _replicas(3), _replicas(3)
    keys = [bytes([k]) * 16 for k in range(32)]
    chosen = [first.order(k)[0].url for k in keys]
    assert chosen == [first.order(k)[0].url for k in keys]  # not in turn: the same replica each time
    assert chosen == [second.order(k)[0].url for k in keys]  # and the same in another client
    assert len(set(chosen)) == 3  # images spread over the replicas
    a = next(r for r in first.replicas if r.url == chosen[0])
    with a.attempt():  # busier than the others: least outstanding still comes first
        assert first.order(keys[0])[0] is not a
    first.mark_down(a)
    assert first.order(keys[0])[-1] is a


def test_attempts_are_counted_even_when_they_fail():
    replica = Replica("h:1", _Channel())
    with pytest.raises(RuntimeError), replica.attempt():
        raise RuntimeError("failed")
    assert (replica.outstanding, replica.requests) == (0, 1)


# ---- real servers ---------------------------------------------------------------------------------------
@pytest.mark.server
def test_a_dead_url_is_skipped_and_readiness_tracked(served):
    dead = f"127.0.0.1:{free_port()}"
    with Blip2Client([dead, served.server.grpc_url], timeout=60, health_interval=0.2) as client:
        results = [client.caption(random_image(i), max_new_tokens=3) for i in range(4)]
        assert all(r.token_ids for r in results)
        assert "".join(client.stream(random_image(1), max_new_tokens=3)) == client.caption(
            random_image(1), max_new_tokens=3).text
        assert client.is_ready()
        ready = {s.url: s.ready for s in client.replicas}
        assert ready == {dead: False, served.server.grpc_url: True}


@pytest.mark.server
def test_no_replica_reachable_is_unavailable_naming_each():
    urls = [f"127.0.0.1:{p}" for p in (free_port(), free_port())]
    with Blip2Client(urls, timeout=30) as client:
        assert not client.is_ready()
        with pytest.raises(UnavailableError) as info:
            client.caption(random_image(1))
    assert all(url in info.value.message for url in urls) and info.value.received_text == ""


# ---- two servers, one killed and brought back -------------------------------------------------------------
CLIENTS = 8  # even ones stream, odd ones ask for one answer
NEW_TOKENS = 40  # the embedded model has 64 positions: 8 image tokens + BOS + 40
REQUEST_TIMEOUT = 120.0
PHASE_TIMEOUT = 180.0  # bound of each phase of the test on a busy machine
HEALTH_INTERVAL = 0.5
REVIVAL_NOTICED = 30.0  # every client's probes find a revived server ready within this (issue 16's bound)


@dataclasses.dataclass
class _Call:
    client: int
    streaming: bool
    began: float
    pieces: list = dataclasses.field(default_factory=list)
    ended: float | None = None
    error: Blip2Error | None = None


class _Load(BackgroundLoad):
    """CLIENTS asyncio clients, each with both URLs, sending requests back to back on a thread of
    their own; every call is recorded, and `current[i]` is client i's call in flight."""

    def __init__(self, urls: list[str]):
        super().__init__(CLIENTS, REQUEST_TIMEOUT + 30)
        self.urls = urls
        self.calls: list[_Call] = []
        self.current: list[_Call | None] = [None] * CLIENTS
        self.clients: list[AsyncBlip2Client | None] = [None] * CLIENTS

    async def _client(self, index: int) -> None:
        async with AsyncBlip2Client(self.urls, timeout=REQUEST_TIMEOUT, health_interval=HEALTH_INTERVAL) as client:
            self.clients[index] = client
            controls = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            n = 0
            while not self._stop.is_set():
                n += 1
                call = _Call(index, index % 2 == 0, time.monotonic())
                self.calls.append(call)
                self.current[index] = call
                image = random_image(100 * index + n % 5)
                try:
                    if call.streaming:
                        async for piece in client.stream(image, **controls):
                            call.pieces.append(piece)
                    else:
                        call.pieces.append((await client.generate(image, **controls)).text)
                except Blip2Error as e:
                    call.error = e
                call.ended = time.monotonic()
                self.current[index] = None

    def on(self, url: str) -> list[_Call]:
        """Calls in flight whose client has its one outstanding request at `url`."""
        found = []
        for index, client in enumerate(self.clients):
            call = self.current[index]
            if client is None or call is None:
                continue
            if any(s.url == url and s.outstanding for s in client.replicas):
                found.append(call)
        return found

    def sent(self) -> dict[str, int]:
        """Requests the clients have sent to each URL so far (retries included)."""
        counts = dict.fromkeys(self.urls, 0)
        for client in self.clients:
            for status in client.replicas if client is not None else ():
                counts[status.url] += status.requests
        return counts

    def see_ready(self, url: str) -> bool:
        """Whether every client's readiness probes have found `url` ready."""
        return all(client is not None and any(s.url == url and s.ready for s in client.replicas)
                   for client in self.clients)

    def served_since(self, moment: float) -> int:
        return sum(c.began >= moment and c.ended is not None and c.error is None for c in list(self.calls))


def _successes(server: TritonServer) -> int:
    """Requests `blip2` has answered, from Triton's own statistics."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/blip2/stats", timeout=10) as r:
        stats = json.load(r)["model_stats"][0]["inference_stats"]
    return int(stats["success"]["count"])


def _wait_for(condition, what: str, timeout: float = PHASE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)


def _freeze_with_work_in_flight(server: TritonServer, load: _Load) -> tuple[list[_Call], list[_Call]]:
    """SIGSTOP the server's process group at a moment when it holds a stream that produced text and
    a request that has not answered yet; -> (those streams, the other calls on it), read while it is
    frozen (nothing it holds can move), after responses already sent have had time to arrive."""
    deadline = time.monotonic() + PHASE_TIMEOUT
    while True:
        assert time.monotonic() < deadline, "the server never held a stream with text and a pending request"
        calls = load.on(server.grpc_url)
        if any(c.streaming and c.pieces for c in calls) and any(not c.pieces for c in calls):
            os.killpg(server.pgid, signal.SIGSTOP)
            time.sleep(0.5)
            calls = load.on(server.grpc_url)
            streams = [c for c in calls if c.streaming and c.pieces and c.ended is None]
            pending = [c for c in calls if not c.pieces and c.ended is None]
            if streams and pending:
                return streams, pending
            os.killpg(server.pgid, signal.SIGCONT)
        time.sleep(0.01)


@pytest.fixture(scope="module")
def two_servers(embedded_repository, tmp_path_factory):
    logs = tmp_path_factory.mktemp("replica-logs")
    with TritonServer(embedded_repository, grpc_port=None, http_port=None, metrics_port=None,
                      log_file=logs / "a.log") as a, \
            TritonServer(embedded_repository, grpc_port=None, http_port=None, metrics_port=None,
                         log_file=logs / "b.log") as b:
        yield a, b, logs


@pytest.mark.server
def test_image_cache_is_per_replica_and_image_affinity_keeps_follow_ups_on_one(two_servers):
    """Each server caches the images it saw. Taken in turn (the default), a client's follow-up
    question lands on the other replica, which runs the image stages again; with image_affinity
    every question on an image goes to one replica, and the other replica never sees it."""
    a, b, _ = two_servers
    servers = (a, b)

    def count(server, name: str) -> float:
        value = metric(server, name)
        return 0.0 if math.isnan(value) else value  # not published before its first update

    def cache_counts():
        return [(count(s, "blip2_image_cache_misses_total"), count(s, "blip2_image_cache_hits_total"))
                for s in servers]

    def ask_twice(affinity: bool, seeds: range) -> tuple[int, int]:
        before = cache_counts()
        with Blip2Client([a.grpc_url, b.grpc_url], timeout=120, image_affinity=affinity) as client:
            for seed in seeds:
                for question in ("what is it?", "what color is it?"):
                    assert client.ask(random_image(seed), question, max_new_tokens=2).token_ids
        after = cache_counts()
        return (int(sum(x[0] - y[0] for x, y in zip(after, before))),
                int(sum(x[1] - y[1] for x, y in zip(after, before))))

    assert ask_twice(False, range(9100, 9104)) == (8, 0)  # in turn: every image computed on both
    assert ask_twice(True, range(9200, 9206)) == (6, 6)  # affinity: once, then answered from the cache


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_replica_killed_and_brought_back(two_servers, embedded_repository):
    a, b, logs = two_servers
    ports = dict(grpc_port=a.ports["grpc"], http_port=a.ports["http"], metrics_port=a.ports["metrics"])
    revived = None
    try:
        with _Load([a.grpc_url, b.grpc_url]) as load:
            start = time.monotonic()
            _wait_for(lambda: _successes(a) >= 4 and _successes(b) >= 4, "both servers serving")

            streams, pending = _freeze_with_work_in_flight(a, load)
            os.killpg(a.pgid, signal.SIGKILL)
            killed = time.monotonic()
            a.stop()
            _wait_for(lambda: all(c.ended is not None for c in streams + pending), "calls held by the dead server end")
            _wait_for(lambda: load.served_since(killed) >= 2 * CLIENTS, "served by the other server alone")

            # Loading under the other server's full load on a shared 2-core machine can take minutes.
            revived = TritonServer(embedded_repository, **ports, log_file=logs / "a-revived.log",
                                   startup_timeout=600).start()
            back = time.monotonic()
            # Until a client's probe finds it ready, that client sends everything to the other server;
            # the share below is the choice's, measured once every client knows.
            _wait_for(lambda: load.see_ready(revived.grpc_url), "every client sees the revived server ready",
                      timeout=REVIVAL_NOTICED)
            noticed, before, served = time.monotonic(), load.sent(), _successes(revived)
            _wait_for(lambda: _successes(revived) >= served + 6 * CLIENTS, "load returns to the revived server")
            after = load.sent()
            sent = {url: after[url] - before[url] for url in after}
            share = sent[revived.grpc_url] / sum(sent.values())
        ended = time.monotonic()
    finally:
        if revived is not None:
            revived.stop()

    calls = load.calls
    failed = [c for c in calls if c.error is not None]
    # Every stream that had produced text on the dead server ends with the clear error, which carries
    # exactly the text its caller had received; no other request fails: the ones the dead server held
    # without an answer yet, and every later one, were served by a replica.
    assert {id(c) for c in failed} == {id(c) for c in streams}, [(c.client, c.error) for c in failed]
    for call in streams:
        assert isinstance(call.error, UnavailableError), call.error
        assert call.error.received_text == "".join(call.pieces) and len(call.error.received_token_ids) >= 1
        assert "went away after" in call.error.message and a.grpc_url in call.error.message
    assert all(c.error is None and len(c.pieces) >= 1 for c in pending)
    assert all(c.ended is not None and c.ended - c.began < REQUEST_TIMEOUT for c in calls)
    # Least outstanding with ties in turn, one request at a time per client: each client alternates,
    # so the revived server is sent half the load again (and served 6 * CLIENTS requests, by its
    # own statistics); a client's request that fails over to the other server shifts one.
    assert share >= 0.3, (share, sent)
    print(json.dumps({"calls": len(calls), "failed_mid_stream": len(failed), "retried_pending": len(pending),
                      "sent_after_revival": sent, "revived_share": round(share, 2), "seconds": {
                          "before_kill": round(killed - start, 1), "kill_to_revived": round(back - killed, 1),
                          "revival_noticed": round(noticed - back, 1),
                          "revived_window": round(ended - noticed, 1)}}))
