"""The bundled blip2-tiny-scenes model through the real Triton server, on held-out scenes.

The issue's yardstick: the checkpoint is exported (fp32, validated against PyTorch), served by
tritonserver, and asked every caption and question of held-out scenes over gRPC with requests
sent concurrently (`Blip2Client.batch`); caption exact match and VQA accuracy per question type
must reach the targets the training aims at.
"""
from __future__ import annotations

import pytest

from blip2_triton.client import Blip2Client
from blip2_triton.evaluation import CAPTION, ClientAnswerer, GenerateAnswerer, evaluate
from blip2_triton.scenes import HELDOUT_SEED, QA_KINDS, generate_scenes
from blip2_triton.server.launcher import TritonServer
from blip2_triton.training import CAPTION_TARGET, DEFAULT_OUTPUT, VQA_TARGET

pytestmark = pytest.mark.server
NUM_SCENES = 100
ALL = 10**6  # keep every miss: they are compared answer by answer


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The same held-out scenes asked through the served fp32 export and through transformers."""
    from blip2_triton.export.exporter import export_checkpoint

    scenes = generate_scenes(NUM_SCENES, HELDOUT_SEED)
    repo = tmp_path_factory.mktemp("repos") / "blip2-tiny-scenes"
    export_checkpoint(DEFAULT_OUTPUT, repo, progress=False)
    log = tmp_path_factory.mktemp("logs") / "blip2-tiny-scenes.log"
    with TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None, log_file=log) as server:
        with Blip2Client(server.grpc_url, timeout=120) as client:
            # 64 concurrent requests at a time: the server's dynamic and continuous batching see real load
            served = evaluate(scenes, ClientAnswerer(client), batch_size=64, max_misses=ALL)
    reference = evaluate(scenes, GenerateAnswerer.from_pretrained(DEFAULT_OUTPUT), batch_size=64, max_misses=ALL)
    print(f"\n{NUM_SCENES} held-out scenes through tritonserver (fp32 export)\n{served.table()}")
    return served, reference


def _check(report, kinds) -> None:
    assert report.total[CAPTION] == NUM_SCENES and all(report.total[k] > 20 for k in QA_KINDS)
    targets = {k: CAPTION_TARGET if k == CAPTION else VQA_TARGET for k in kinds}
    below = {k: f"{report.accuracy(k):.1%} < {t:.0%}" for k, t in targets.items() if report.accuracy(k) < t}
    assert not below, f"below target: {below}\n{report.table()}"


def test_served_answers_are_transformers_answers(reports):
    """Every item right or wrong alike: the same counts and the very same wrong answers."""
    served, reference = reports
    assert served.correct == reference.correct and served.total == reference.total
    assert served.misses == reference.misses


def test_served_accuracy_meets_the_targets(reports):
    _check(reports[0], (CAPTION, *QA_KINDS))
