"""The soak, 60 s of it, on the real server (`blip2-triton soak` runs it for 30 minutes): 4 clients
mixing good, streamed, beam, bad and cancelled requests. No request fails, every bad one is
refused, no sequence is left active, and memory does not grow.

The soak command's pass criterion, the whole server's RSS slope over the second half (2 %/h), needs
minutes: over 30 s it is noise, as the preprocess process's heap moves by tens of MiB either way.
tritonserver's own RSS is steady, but 2.51 keeps a few KiB for every gRPC stream ever opened, and
the client reuses its streams (client/aio.py), a cancelled call's too once it is stopped. So its
growth is bounded per stream the clients opened plus a fixed allowance: a per-request leak would
show as many times the per-stream figure, since most calls reuse a stream."""
from __future__ import annotations

import pytest

from blip2_triton.benchmarks.soak import Settings, report, run, summarize

pytestmark = pytest.mark.server
MAX_KIB_PER_STREAM = 8.0  # tritonserver's growth per stream opened
MAX_FIXED_GROWTH_MIB = 2.0  # tritonserver's growth over the second half beside it
MAX_GROWTH = 10.0  # % of the server's RSS, from the end of the warm-up to the end


def test_a_minute_of_mixed_load(exported):
    _, repo, _ = exported("tiny-opt")
    settings = Settings(seconds=60, clients=4, sample_every=1.0, warmup_seconds=20)
    raw = run(repo, settings)
    summary = summarize(raw)
    print(report(raw, summary))
    assert summary["failures"] == 0, summary["failure_examples"]
    assert all(summary["by_kind"].get(kind, {}).get("ok", 0) > 0 for kind in settings.kinds), summary["by_kind"]
    assert summary["active_sequences_at_end"] == 0
    # a call started while a cancelled one is still being stopped opens a stream; nothing else does once every client has one
    cancelled = summary["by_kind"]["cancelled"]["ok"]
    assert summary["streams_opened"] <= cancelled + settings.clients, (summary["streams_opened"], cancelled)
    growth = summary["rss_by_process"]["tritonserver"]["second_half_growth_mib"]
    allowed = MAX_FIXED_GROWTH_MIB + MAX_KIB_PER_STREAM * summary["second_half_streams_opened"] / 1024
    assert growth < allowed, (growth, allowed, summary["rss_by_process"])
    assert summary["growth_after_warmup_percent"] < MAX_GROWTH, summary["rss_by_process"]
