"""Several Triton servers serving the same model (replicas) behind one client.

A request goes to the ready replica with the fewest requests outstanding from this client (ties
taken in turn). Readiness is tracked two ways: a request that fails with UnavailableError marks
its replica down at once, and, when there is more than one replica, a background task asks every
replica each `health_interval` seconds whether it is ready (gRPC ServerReady and ModelReady, the
equivalents of `/v2/health/ready` and `/v2/models/<model>/ready`), which is how a replica that
came back gets its share of the load again. Replicas not known to be down are tried first, then
the others (their readiness may be stale), each at most once per request.

With an affinity key (the client's `image_affinity`: a hash of the request's image), ties are
broken by rendezvous hashing of the key and each URL instead of in turn: every client sends
requests on one image to the same replica while it is no busier than the others, so that
replica's image cache answers the follow-up questions.

The client decides what may be retried (aio.py): this module only keeps the books.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

DEFAULT_HEALTH_INTERVAL = 1.0  # seconds between readiness probes of each replica
PROBE_TIMEOUT = 2.0  # seconds a readiness probe may take before the replica counts as not ready


@dataclass(frozen=True)
class ReplicaStatus:
    """What a client knows of one replica: `ready` is None before anything was learnt about it;
    `outstanding` counts this client's requests in flight there, `requests` all it sent there."""

    url: str
    ready: bool | None
    outstanding: int
    requests: int


class Replica:
    """One server: its URL, its gRPC client, and this client's bookkeeping for it."""

    def __init__(self, url: str, client):
        self.url, self.client = url, client
        self.ready: bool | None = None
        self.outstanding = 0
        self.requests = 0

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(self.url, self.ready, self.outstanding, self.requests)

    @contextlib.contextmanager
    def attempt(self):
        """Count one request in flight here for as long as the block runs."""
        self.outstanding += 1
        self.requests += 1
        try:
            yield self
        finally:
            self.outstanding -= 1


def parse_urls(urls: str | Sequence[str]) -> tuple[str, ...]:
    """One URL or several (a sequence) -> a tuple of distinct URLs, in the order given."""
    from .errors import InvalidArgumentError

    listed = [urls] if isinstance(urls, str) else list(urls)
    if not listed or any(not isinstance(u, str) or not u.strip() for u in listed):
        raise InvalidArgumentError(f"server URLs must be non-empty strings host:port, got {urls!r}")
    cleaned = [u.strip() for u in listed]
    if len(set(cleaned)) != len(cleaned):
        raise InvalidArgumentError(f"a server URL is listed twice: {cleaned}")
    return tuple(cleaned)


class Replicas:
    """The replicas of one client; `order()` is the order in which a request tries them."""

    def __init__(self, urls: Sequence[str], model: str, make_client: Callable[[str], object],
                 health_interval: float = DEFAULT_HEALTH_INTERVAL):
        self.model = model
        self.health_interval = health_interval
        self.replicas = [Replica(url, make_client(url)) for url in urls]
        self._turn = 0
        self._monitor: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.replicas)

    def order(self, affinity: bytes | None = None) -> list[Replica]:
        """Replicas not known to be down, fewest outstanding first, then those known to be down.
        Ties: in turn, so that a client with one request at a time spreads its requests evenly; or,
        given an `affinity` key, the replica the key hashes highest with (the same in every client)."""
        n = len(self.replicas)
        turn, self._turn = self._turn, self._turn + 1
        if affinity is not None:
            tie = {id(r): -int.from_bytes(hashlib.blake2b(affinity + r.url.encode(), digest_size=8).digest(), "big")
                   for r in self.replicas}
        else:
            tie = {id(r): (i - turn) % n for i, r in enumerate(self.replicas)}
        return sorted(self.replicas, key=lambda r: (r.ready is False, r.outstanding, tie[id(r)]))

    def mark_down(self, replica: Replica) -> None:
        replica.ready = False

    def status(self) -> list[ReplicaStatus]:
        return [r.status() for r in self.replicas]

    async def probe(self, replica: Replica) -> bool:
        """Ask one replica whether it and the model are ready; records and returns the answer."""
        try:
            ready = bool(await replica.client.is_server_ready(client_timeout=PROBE_TIMEOUT)) and bool(
                await replica.client.is_model_ready(self.model, client_timeout=PROBE_TIMEOUT))
        except asyncio.CancelledError:
            raise
        except Exception:  # refused, timed out, unknown host, ...: all mean "not ready"
            ready = False
        replica.ready = ready
        return ready

    async def probe_all(self) -> list[bool]:
        return list(await asyncio.gather(*(self.probe(r) for r in self.replicas)))

    def watch(self) -> None:
        """Start the readiness probes (once, on the running loop) when there is a choice to make."""
        if len(self.replicas) > 1 and (self._monitor is None or self._monitor.done()):
            self._monitor = asyncio.get_running_loop().create_task(self._watch(), name="blip2-replica-health")

    async def _watch(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.health_interval)

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        for replica in self.replicas:
            await replica.client.close()
