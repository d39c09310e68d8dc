"""`blip2-triton bench-retrieval` in miniature: the trained retrieval model exported, served and
timed against transformers, a small gallery indexed through the server into local Qdrant and
searched; the raw JSON and the tables written."""
from __future__ import annotations

import json

import pytest

from blip2_triton.toy.embedded import RETRIEVAL_MODEL

pytestmark = pytest.mark.server


def test_retrieval_bench_measures_every_row_and_writes_json_and_tables(tmp_path):
    from blip2_triton.benchmarks.retrieval import Settings, report, run

    settings = Settings(threads=1, reps=2, warmup=1, throughput_images=4, concurrency=2, index_images=40, queries=4)
    results = run([str(RETRIEVAL_MODEL)], settings, tmp_path / "work", tmp_path / "out")
    m = results["models"][RETRIEVAL_MODEL.name]
    for key in ("embed_image_latency", "itm_pair_latency"):
        for system in ("server", "transformers"):
            row = m["calls"][key][system]
            assert row["n"] == 2 and 0 < row["p50_ms"] <= row["p99_ms"], (key, system, row)
    throughput = m["calls"]["embed_image_throughput"]
    assert throughput["server"]["images_per_s"] > 0 and throughput["transformers"]["images_per_s"] > 0
    search = m["search"]
    assert search["index"]["indexed"] == search["index"]["count"] == 40 and search["index"]["refused"] == 0
    for rerank in (0, settings.rerank):
        assert search[f"search_rerank_{rerank}"]["n"] == 4
        assert search[f"search_rerank_{rerank}"]["top1_caption_right"] >= 0.75  # the model retrieves (0.99 at 500)
    saved = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert saved["models"].keys() == results["models"].keys() and saved["facts"]["git"]
    assert (tmp_path / "out" / "retrieval.md").read_text() == report(saved)
