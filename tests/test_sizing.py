"""Sizing a repository for its machine: every option renders into config.pbtxt, defaults follow the
machine, bad options are refused, and the real server loads a repository re-rendered with two
instances of `preprocess` and `vision_encoder` (no re-export), answers as transformers does, and
runs requests on both instances."""
from __future__ import annotations

import re
import shutil

import pytest

from blip2_triton import api, specs
from blip2_triton.pbtxt import render
from blip2_triton.repository import model_configs
from blip2_triton.sizing import ModelSizing, Sizing, SizingError

from .conftest import random_image, reference


def _config(tiny_checkpoints):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_checkpoints("tiny-opt"))


def test_every_option_renders(tiny_checkpoints):
    sizing = Sizing({api.PREPROCESS: ModelSizing(instances=3, max_batch_size=8, max_queue_delay_us=500),
                     specs.VISION_ENCODER: ModelSizing(instances=2, threads=4, max_batch_size=32),
                     specs.QFORMER: ModelSizing(threads=2, max_queue_delay_us=100),
                     api.PIPELINE: ModelSizing(instances=2, threads=6)}, gpus=(0, 1), exclusive_compute=False)
    text = {c.name: render(c) for c in model_configs(_config(tiny_checkpoints), sizing=sizing)}
    assert "count: 3 kind: KIND_GPU gpus: [ 0, 1 ]" in text[api.PREPROCESS]
    assert "max_batch_size: 8" in text[api.PREPROCESS] and "max_queue_delay_microseconds: 500" in text[api.PREPROCESS]
    assert "count: 2 kind: KIND_GPU" in text[specs.VISION_ENCODER] and "max_batch_size: 32" in text[specs.VISION_ENCODER]
    assert 'key: "ort_threads" value: { string_value: "4" }' in text[specs.VISION_ENCODER]
    assert 'key: "ort_providers" value: { string_value: "CUDAExecutionProvider,CPUExecutionProvider" }' \
        in text[specs.QFORMER]
    assert "max_queue_delay_microseconds: 100" in text[specs.QFORMER]
    assert 'key: "ort_threads" value: { string_value: "6" }' in text[api.PIPELINE]
    assert all('key: "exclusive_compute" value: { string_value: "false" }' in text[m]
               for m in (specs.VISION_ENCODER, specs.QFORMER, api.PIPELINE))
    # the default is what export always wrote: one instance each, on the CPU, taking turns
    default = {c.name: render(c) for c in model_configs(_config(tiny_checkpoints))}
    assert all("count: 1 kind: KIND_CPU }" in t for name, t in default.items() if name != api.ENSEMBLE)
    assert "ort_threads" not in "".join(default.values())
    assert 'key: "exclusive_compute" value: { string_value: "true" }' in default[api.PIPELINE]
    # the ensemble runs no instances of its own, whatever the sizing: its steps are placed
    assert "instance_group" not in text[api.ENSEMBLE] and "instance_group" not in default[api.ENSEMBLE]


def test_defaults_follow_the_machine():
    small = Sizing.for_machine(cores=2, gpus=())
    assert small.kind == "KIND_CPU" and small.exclusive_compute
    assert all(small.model(m).instances == 1 for m in (api.PREPROCESS, specs.VISION_ENCODER, api.PIPELINE))
    large = Sizing.for_machine(cores=32, gpus=(0, 1))
    assert large.kind == "KIND_GPU" and large.gpus == (0, 1) and not large.exclusive_compute
    assert large.model(api.PREPROCESS).instances == 4


@pytest.mark.parametrize("make,words", [
    (lambda: Sizing({"decoder": ModelSizing()}), "unknown model"),
    (lambda: Sizing({api.PREPROCESS: ModelSizing(instances=0)}), "instances must be an integer >= 1"),
    (lambda: Sizing({specs.QFORMER: ModelSizing(threads=0)}), "threads must be"),
    (lambda: Sizing({api.PREPROCESS: ModelSizing(threads=2)}), "runs no onnxruntime session"),
    (lambda: Sizing({api.PIPELINE: ModelSizing(max_batch_size=4)}), "stateless models"),
    (lambda: Sizing({specs.QFORMER: ModelSizing(max_queue_delay_us=-1)}), "queue delay"),
    (lambda: Sizing(gpus=(-1,)), "device ids"),
])
def test_bad_options_are_refused(make, words):
    with pytest.raises(SizingError, match=words):
        make()


def test_the_cli_reads_every_flag():
    import argparse

    from blip2_triton.sizing import add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--instances", "vision_encoder=2", "--threads", "qformer=3", "--max-batch-size",
                              "preprocess=4", "--queue-delay-us", "qformer=50", "--gpus", "1,3",
                              "--no-exclusive-compute"])
    sizing = from_arguments(args)
    assert sizing.model(specs.VISION_ENCODER).instances == 2 and sizing.model(specs.QFORMER).threads == 3
    assert sizing.model(api.PREPROCESS).max_batch_size == 4 and sizing.model(specs.QFORMER).max_queue_delay_us == 50
    assert sizing.gpus == (1, 3) and not sizing.exclusive_compute
    with pytest.raises(SizingError, match="MODEL=N"):
        from_arguments(parser.parse_args(["--instances", "vision_encoder"]))


@pytest.mark.server
@pytest.mark.slow
def test_two_instances_load_answer_as_transformers_and_both_run(exported, tmp_path):
    from blip2_triton.client import Blip2Client
    from blip2_triton.cli import main
    from blip2_triton.server import TritonServer

    ckpt, repo, _ = exported("tiny-opt")
    sized = tmp_path / "repo"
    shutil.copytree(repo, sized)
    graphs = {p: p.stat().st_mtime_ns for p in sized.rglob("*.onnx")}
    assert main(["configure", "--repository", str(sized), "--instances", "preprocess=2",
                 "--instances", "vision_encoder=2", "--threads", "vision_encoder=1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in sized.rglob("*.onnx")} == graphs  # graphs untouched
    log = tmp_path / "tritonserver.log"
    with TritonServer(sized, grpc_port=None, http_port=None, metrics_port=None, log_file=log, log_verbose=1) as server:
        assert server.model_config(specs.VISION_ENCODER)["instance_group"][0]["count"] == 2
        with Blip2Client(server.grpc_url, timeout=120) as client:
            # Concurrent rounds, so that both instances of each stage take batches; new pictures in
            # each round, since blip2's image cache would answer a repeated one without the stages.
            rounds = [client.batch([random_image(seed) for seed in range(12 * r, 12 * r + 12)], max_new_tokens=5)
                      for r in range(3)]
    results = rounds[0]
    for seed in (0, 1):
        ids, text = reference(ckpt, seed, "", checkpoint_config=True, max_new_tokens=5)
        assert (results[seed].token_ids, results[seed].text) == (ids, text)
    executed = log.read_text()
    for model in (api.PREPROCESS, specs.VISION_ENCODER):
        used = {m for m in re.findall(rf"\b({model}_0_[01])\b.*execut", executed, re.IGNORECASE)}
        if not used:  # the line's wording differs between versions: show it
            lines = [l for l in executed.splitlines() if f"{model}_0_1" in l][:5]
            pytest.fail(f"no execution lines for {model}: {lines}")
        assert used == {f"{model}_0_0", f"{model}_0_1"}, used
