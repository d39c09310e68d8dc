"""Image-text retrieval (issue 13): the export gate, and ITM / ITC / embeddings through the real
server against transformers' Blip2ForImageTextRetrieval on the same weights, on every retrieval
preset; bad input; a repository holding a generation and a retrieval checkpoint side by side."""
from __future__ import annotations

import asyncio
import functools
import io

import numpy as np
import pytest

from blip2_triton.toy.presets import RETRIEVAL_PRESETS

from .conftest import pil, random_image

TEXTS = ("a red circle", "two blue squares above a green triangle", "a yellow square on the left of the image")
TOLERANCE = 1e-4  # absolute, through the server (issue 13)


@functools.lru_cache(maxsize=None)
def retrieval_model(ckpt: str):
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    return Blip2ForImageTextRetrieval.from_pretrained(ckpt).eval(), AutoProcessor.from_pretrained(ckpt)


def reference(ckpt, image_seed: int, text: str) -> dict:
    """transformers on one pair: ITM probability (use_image_text_matching_head=True), ITC similarity
    and the normalized embeddings (False), with the processor's own inputs."""
    import torch

    model, processor = retrieval_model(str(ckpt))
    inputs = processor(images=pil(image_seed), text=text, return_tensors="pt")
    with torch.no_grad():
        itm = model(**inputs, use_image_text_matching_head=True)
        itc = model(**inputs, use_image_text_matching_head=False)
    return {
        "itm_probability": float(itm.logits_per_image.softmax(dim=1)[0, 1]),
        "itc_similarity": float(itc.logits_per_image[0, 0]),
        "image_embeds": itc.image_embeds[0].numpy(),
        "text_embeds": itc.text_embeds[0].numpy(),
    }


def test_every_retrieval_graph_passes_the_gate(exported):
    from blip2_triton import specs

    for preset in RETRIEVAL_PRESETS:
        _, repo, report = exported(preset)
        assert report.validated
        assert set(report.max_abs_diff) == {s.name for s in specs.retrieval_specs(_config(repo))}
        assert all(c["ok"] for c in report.checks) and len(report.checks) >= 8


def test_gate_rejects_retrieval_graphs_of_other_weights(exported, tmp_path):
    """Each retrieval graph checked against another seed's module fails: the gate sees the weights."""
    from blip2_triton import repository
    from blip2_triton.export.exporter import load_checkpoint
    from blip2_triton.export.families import family_graphs
    from blip2_triton.export.validate import check_graph
    from blip2_triton.toy.presets import build_tiny_checkpoint

    _, repo, _ = exported("tiny-itm")
    model, _ = load_checkpoint(build_tiny_checkpoint(tmp_path / "other", "tiny-itm", seed=1))
    graphs = family_graphs(model)
    assert [g.spec.name for g in graphs] == list(repository.RETRIEVAL_GRAPHS)
    for graph in graphs:
        assert any(not c.ok for c in check_graph(graph, repository.graph_path(repo, graph.spec.name))), graph.spec.name


def test_a_stage_batches_requests_of_one_shape_and_runs_others_apart(exported):
    """run_batched (the stage models' execute): texts of two lengths in one Triton batch each get
    what they get alone, and a request that fails (a bad dtype here) fails alone."""
    from blip2_triton import repository, specs
    from blip2_triton.serving.onnx_graph import OnnxGraph, run_batched
    from blip2_triton.serving.retrieval import text_inputs

    _, repo, _ = exported("tiny-itm")
    graph = OnnxGraph(repository.graph_path(repo, specs.TEXT_FEATURES))
    requests = [text_inputs(np.arange(5, 5 + n)) for n in (4, 7, 4, 7, 5)]
    bad = {specs.INPUT_IDS: np.zeros((1, 3, 2), np.int64), specs.ATTENTION_MASK: np.ones((1, 3, 2), np.int64)}
    results = run_batched(graph, [*requests, bad])
    assert isinstance(results[-1], Exception)
    for inputs, result in zip(requests, results):
        alone = graph(**inputs)[specs.TEXT_EMBEDS_PROJ]
        assert np.abs(result[specs.TEXT_EMBEDS_PROJ] - alone).max() <= 1e-6


def _config(repo):
    from transformers import AutoConfig

    from blip2_triton.repository import retrieval_assets_dir

    return AutoConfig.from_pretrained(retrieval_assets_dir(repo))


@pytest.fixture(scope="module", params=sorted(RETRIEVAL_PRESETS))
def served_retrieval(request, exported, tiny_checkpoints, tmp_path_factory):
    """One retrieval preset on a real tritonserver. tiny-itm's repository also holds tiny-opt's
    generation export, as one repository serving both kinds of checkpoint."""
    from blip2_triton.client import Blip2Client
    from blip2_triton.export.exporter import export_checkpoint
    from blip2_triton.server import TritonServer

    preset = request.param
    ckpt, repo, _ = exported(preset)
    if preset == "tiny-itm":
        repo = tmp_path_factory.mktemp("both") / "repo"
        export_checkpoint(tiny_checkpoints("tiny-opt"), repo, progress=False)
        export_checkpoint(ckpt, repo, progress=False)  # leaves the generation models in place
    log = tmp_path_factory.mktemp("served-retrieval") / "tritonserver.log"
    # Twelve model processes start at once (eight for tiny-itm-wide): generous on a loaded machine.
    with TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None, log_file=log,
                      startup_timeout=900) as server, Blip2Client(server.grpc_url, timeout=120) as client:
        yield preset, ckpt, repo, client


@pytest.mark.server
def test_match_and_embeddings_equal_transformers_through_the_server(served_retrieval):
    _, ckpt, _, client = served_retrieval
    worst = {"itm": 0.0, "itc": 0.0, "image": 0.0, "text": 0.0}
    for seed in (0, 1):
        for text in TEXTS:
            ref = reference(ckpt, seed, text)
            got = client.match(random_image(seed), text)
            worst["itm"] = max(worst["itm"], abs(got.itm_probability - ref["itm_probability"]))
            worst["itc"] = max(worst["itc"], abs(got.itc_similarity - ref["itc_similarity"]))
            worst["text"] = max(worst["text"], float(np.abs(client.embed_text(text) - ref["text_embeds"]).max()))
        image = client.embed_image(random_image(seed))
        assert image.shape == ref["image_embeds"].shape and image.dtype == np.float32
        worst["image"] = max(worst["image"], float(np.abs(image - ref["image_embeds"]).max()))
    print(f"{served_retrieval[0]}: max |served - transformers| " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    assert all(v <= TOLERANCE for v in worst.values()), worst


@pytest.mark.server
def test_concurrent_calls_of_different_lengths_give_the_answers_of_single_calls(served_retrieval):
    """Requests batched together in the stages (texts of several lengths among them) answer as alone."""
    _, ckpt, repo, client = served_retrieval
    from blip2_triton.client import AsyncBlip2Client

    pairs = [(seed, text) for seed in (2, 3) for text in TEXTS]
    alone = [client.match(random_image(seed), text) for seed, text in pairs]

    async def together():
        async with AsyncBlip2Client(client.url, timeout=120) as aclient:
            return await asyncio.gather(*(aclient.match(random_image(seed), text) for seed, text in pairs),
                                        *(aclient.embed_text(text) for text in TEXTS))

    results = asyncio.run(together())
    for a, b in zip(alone, results[: len(pairs)]):
        assert abs(a.itm_probability - b.itm_probability) <= 1e-5 and abs(a.itc_similarity - b.itc_similarity) <= 1e-5
    for text, embedding in zip(TEXTS, results[len(pairs):]):
        assert np.abs(embedding - client.embed_text(text)).max() <= 1e-5


@pytest.mark.server
def test_bad_input_is_refused_with_a_reason_and_the_next_request_is_served(served_retrieval):
    from blip2_triton.api import Reason
    from blip2_triton.client import InvalidArgumentError

    _, ckpt, _, client = served_retrieval
    image = random_image(0)
    cases = [
        (lambda: client.match(image, ""), Reason.TEXT, "empty"),
        (lambda: client.embed_text("   "), Reason.TEXT, "empty"),
        (lambda: client.embed_text("red " * 200), Reason.TEXT, "tokens"),
        (lambda: client.match(image, "circle " * 200), Reason.TEXT, "tokens"),
        (lambda: client.match(b"not an image", "a red circle"), Reason.IMAGE, "cannot decode"),
        (lambda: client.embed_image(b""), Reason.IMAGE, "empty"),
    ]
    for call, reason, words in cases:
        with pytest.raises(InvalidArgumentError) as e:
            call()
        assert e.value.reason is reason and words in e.value.message, e.value.message
    assert client.match(image, TEXTS[0]).itm_probability == pytest.approx(reference(ckpt, 0, TEXTS[0])["itm_probability"],
                                                                          abs=TOLERANCE)


@pytest.mark.server
def test_wrong_shapes_and_types_are_refused_by_triton(served_retrieval):
    import tritonclient.grpc as grpcclient

    from blip2_triton.client.errors import InvalidArgumentError, from_triton

    _, _, _, client = served_retrieval
    raw = grpcclient.InferenceServerClient(client.url)
    text = grpcclient.InferInput("text", [1, 2], "BYTES")
    text.set_data_from_numpy(np.asarray([[b"a", b"b"]], dtype=object))
    wrong_type = grpcclient.InferInput("text", [1, 1], "INT32")
    wrong_type.set_data_from_numpy(np.zeros((1, 1), np.int32))
    for inputs in ([text], [wrong_type]):
        with pytest.raises(Exception) as e:
            raw.infer("embed_text", inputs)
        assert isinstance(from_triton(e.value), InvalidArgumentError), e.value
    raw.close()
    assert client.embed_text(TEXTS[0]).shape[0] > 0


@pytest.mark.server
def test_a_repository_serves_generation_and_retrieval_side_by_side(served_retrieval):
    """tiny-itm's repository holds tiny-opt's export too: both are served; the other, only retrieval."""
    from blip2_triton import repository

    preset, _, repo, client = served_retrieval
    both = preset == "tiny-itm"
    expected = set(repository.RETRIEVAL_MODELS) | (set(repository.GENERATION_MODELS) if both else set())
    assert {p.name for p in repo.iterdir() if (p / "config.pbtxt").exists()} == expected
    if both:
        assert client.caption(random_image(0), max_new_tokens=3).token_ids


# ---- CLI: match, index, search ---------------------------------------------------------------------
def _cli(capsys, *argv) -> tuple[int, str, str]:
    from blip2_triton.cli import main

    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.server
def test_match_cli_prints_one_json_object_per_pair(served_retrieval, tmp_path, capsys):
    import json

    _, _, _, client = served_retrieval
    image = tmp_path / "image.png"
    image.write_bytes(random_image(4))
    status, out, _ = _cli(capsys, "match", str(image), TEXTS[0], TEXTS[1], "--json", "--url", client.url)
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in records] == list(TEXTS[:2])
    for r in records:
        m = client.match(image, r["text"])
        assert set(r) == {"image", "text", "itm_probability", "itc_similarity"}
        assert (r["itm_probability"], r["itc_similarity"]) == pytest.approx((m.itm_probability, m.itc_similarity), abs=1e-6)
    status, out, err = _cli(capsys, "match", str(image), "", "--url", client.url)
    assert status == 1 and "invalid argument [text]" in err and out == ""


def _gallery(directory, seeds) -> list:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = directory / f"scene_{seed:03d}.png"
        path.write_bytes(random_image(seed))
        paths.append(path)
    return paths


@pytest.mark.server
def test_index_then_search_ranks_as_itc_and_itm_do(served_retrieval, tmp_path, capsys):
    """Text search equals ITC computed by hand over the gallery; --rerank orders the best N by ITM;
    an indexed image finds itself first; a bad file is refused and everything else is indexed."""
    import json

    from blip2_triton.client.index import ImageIndex

    _, _, _, client = served_retrieval
    paths = _gallery(tmp_path / "images", range(10, 22))
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    db, url = str(tmp_path / "db"), client.url
    status, out, err = _cli(capsys, "index", str(tmp_path / "images"), "--collection", "c", "--db", db, "--url", url)
    assert status == 1 and "indexed 12, already indexed 0, refused 1" in out and "broken.png" in err
    status, out, _ = _cli(capsys, "index", str(tmp_path / "images"), "--collection", "c", "--db", db, "--url", url)
    assert "indexed 0, already indexed 12, refused 1" in out  # resumable: nothing embedded twice

    text = TEXTS[1]
    query = client.embed_text(text)
    itc = {str(p.resolve()): float(np.max(client.embed_image(p) @ query)) for p in paths}
    by_itc = sorted(itc, key=lambda p: -itc[p])
    status, out, _ = _cli(capsys, "search", text, "--collection", "c", "--db", db, "--url", url, "--top-k", "5", "--json")
    hits = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [h["path"] for h in hits] == by_itc[:5]
    assert [h["itc_similarity"] for h in hits] == pytest.approx([itc[p] for p in by_itc[:5]], abs=1e-5)

    status, out, _ = _cli(capsys, "search", text, "--collection", "c", "--db", db, "--url", url, "--top-k", "5",
                          "--rerank", "4", "--json")
    hits = [json.loads(line) for line in out.splitlines()]
    itm = {p: client.match(p, text).itm_probability for p in by_itc[:4]}
    assert [h["path"] for h in hits[:4]] == sorted(itm, key=lambda p: -itm[p]) and hits[4]["path"] == by_itc[4]
    assert "itm_probability" not in hits[4]

    status, out, _ = _cli(capsys, "search", "--image", str(paths[3]), "--collection", "c", "--db", db, "--url", url,
                          "--json", "--top-k", "3")
    hits = [json.loads(line) for line in out.splitlines()]
    assert hits[0]["path"] == str(paths[3].resolve()) and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5)

    for argv, words in ((("", "--collection", "c"), "invalid argument [text]"),
                        (("a red circle", "--collection", "nothing"), "no collection 'nothing'"),
                        (("--image", str(paths[0]), "--rerank", "2", "--collection", "c"), "--rerank needs a text")):
        status, out, err = _cli(capsys, "search", *argv, "--db", db, "--url", url)
        assert status == 1 and words in err, err
    with ImageIndex("c", db) as index:
        assert index.count() == 12  # refusals lost nothing


@pytest.mark.server
def test_index_killed_midway_leaves_a_collection_the_next_run_completes(served_retrieval, tmp_path):
    """SIGKILL the indexer (a crash) once it has written some points: the collection opens and
    searches, and the next run embeds only what is missing."""
    import os
    import signal
    import subprocess
    import sys

    from blip2_triton.client.index import ImageIndex

    _, _, _, client = served_retrieval
    count = 48
    _gallery(tmp_path / "images", range(100, 100 + count))
    db = str(tmp_path / "db")
    argv = [sys.executable, "-m", "blip2_triton.cli", "index", str(tmp_path / "images"), "--collection", "c",
            "--db", db, "--url", client.url, "--concurrency", "2"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen = b""
    try:
        while b"4/%d" % count not in seen and process.poll() is None:  # tqdm's counter, after two batches
            seen += os.read(process.stderr.fileno(), 4096) or b""
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(30)
        process.stderr.close()
    with ImageIndex("c", db) as index:
        before = index.count()
        assert 4 <= before <= count
        assert len(index.nearest(client.embed_text(TEXTS[0])[None], 3)) == 3
    with ImageIndex("c", db) as index:
        report = client.index(index, tmp_path / "images")
        assert (report.indexed, report.skipped, report.refused) == (count - before, before, [])
        assert index.count() == count


def test_a_local_database_in_use_is_a_clear_error(tmp_path):
    """qdrant-client's local mode serves one process at a time: a second one gets CollectionError."""
    import subprocess
    import sys

    from blip2_triton.client.index import ImageIndex

    with ImageIndex("c", tmp_path / "db"):
        code = f"from blip2_triton.client.index import ImageIndex; ImageIndex('c', {str(tmp_path / 'db')!r})"
        err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr
    assert "CollectionError" in err and "already accessed by another instance" in err
