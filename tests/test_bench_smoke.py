"""Smoke test of `blip2-triton bench`: the whole benchmark, end to end, on a tiny OPT and a tiny T5
model with minimal repetitions. It checks that every section is there with sane values; it asserts
nothing about speed (benchmarks are not tests). Also: bench.json's records read the committed
results back unchanged, and the README's schema is the one the records define."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from blip2_triton.benchmarks import records
from blip2_triton.benchmarks.report import markdown
from blip2_triton.benchmarks.run import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    work = tmp_path_factory.mktemp("bench-work")
    assert main(["--model", "tiny-opt", "--model", "tiny-t5", "--quick", "--output", str(out), "--workdir", str(work),
                 "--quiet"]) == 0
    return out, json.loads((out / "bench.json").read_text())


def positive(summary: dict) -> bool:
    return summary["n"] > 0 and 0 < summary["p50"] <= summary["p90"] <= summary["p99"]


@pytest.mark.server
@pytest.mark.slow
def test_run_records_where_and_how_it_ran(results):
    _, r = results
    facts = r["facts"]
    assert facts["git"]["commit"] and facts["date"] and facts["usable_cores"] >= 1
    assert facts["packages"]["torch"] and facts["packages"]["onnxruntime"]
    assert r["settings"]["threads"] >= 1
    caps = r["capabilities"]
    assert caps["read_gbps"] > 0 and caps["matmul_gflops"] > 0 and caps["matmul_gflops_onnxruntime"] > 0
    # Every served model's process was started with the benchmark's thread count.
    served = r["models"]["tiny-opt"]["server_threads_env"]
    assert set(served) == {"blip2", "preprocess", "vision_encoder", "qformer"}, served
    assert set(served.values()) == {str(r["settings"]["threads"])}, served


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-opt", "tiny-t5"])
def test_every_section_is_present_with_sane_numbers(results, model):
    _, r = results
    m = r["models"][model]
    assert m["floor"]["floor_ms"] > 0 and m["decoder_weights"]["bytes_read_per_step"] > 0
    for name, w in m["end_to_end"].items():
        for system in ("server", "in_process", "transformers"):
            assert positive(w[system]["latency_ms"]), (name, system)
            assert w[system]["tokens_per_s"] > 0
        assert positive(w["server_stream"]["ttft_ms"])
        assert positive(w["in_process"]["ttft_ms"]) and positive(w["transformers"]["ttft_ms"])
        ratios = w["ratios_ours_over_transformers"]
        assert ratios["server_latency_p50"] > 0 and ratios["in_process_latency_p50"] > 0
        assert ratios["server_stream_ttft_p50"] > 0
        assert w["server_overhead_ms"]["p50_difference"] is not None
    stages = m["stages"]
    for name, s in stages["in_process"].items():
        for key in ("preprocess_ms", "vision_encoder_ms", "qformer_ms", "prefill_ms", "decode_ms", "postprocess_ms"):
            assert s[key] > 0, (name, key)
    # server side per workload: Triton's statistics and the engine's own stage metrics, each
    # workload's requests alone (reps requests of `tokens` tokens, one at a time)
    reps = r["settings"]["reps"]
    assert set(stages["server"]) == set(m["end_to_end"])
    for w in m["workloads"]:
        server = stages["server"][w["name"]]
        assert {"preprocess", "vision_encoder", "qformer", "blip2"} <= set(server["models"])
        assert all(v["requests"] == reps for v in server["models"].values()), server["models"]
        g = server["generator_metrics"]
        assert g["prefills"] == reps and g["generated_tokens"] == reps * w["max_new_tokens"]
        assert g["decode_steps"] == reps * (w["max_new_tokens"] - 1)
        assert g["detokenize_per_request"] == 1  # not streamed: the whole text once
        assert 0 < g["decode_step_ms"] < g["prefill_ms"] + g["decode_step_ms"] < g["engine_ttft_ms"]
        assert 0 < g["detokenize_ms"] < g["engine_ttft_ms"]
        # time to first token counts from execute(): it holds the image stages' compute
        image_stages = sum(server["models"][k]["compute_infer_ms"] for k in ("preprocess", "vision_encoder", "qformer"))
        assert g["engine_ttft_ms"] > image_stages + g["prefill_ms"]
    # floors of the vision encoder, Q-Former and prefill: FLOPs counted on the graphs, bound = max
    for w, by_stage in m["stage_floors"].items():
        assert set(by_stage) == {"vision_encoder", "qformer", "prefill"}
        for stage, f in by_stage.items():
            assert f["gflops"] > 0 and f["floor_ms"] == max(f["compute_floor_ms"], f["bytes_floor_ms"]) > 0, (w, stage)
            assert f["in_process_over_floor"] > 0 and f["server_over_floor"] > 0, (w, stage)
    costs = m["graph_costs"]
    assert costs["prefill:vqa"]["flops"] > costs["prefill:caption"]["flops"]  # a longer prompt to prefill
    assert costs["vision_encoder"]["flops_by_op"]["Conv"] > 0 and costs["qformer"]["flops_by_op"]["MatMul"] > 0
    assert all(d["step_ms"] > 0 for d in stages["decode_step_vs_rows"])
    assert [t["streams"] for t in m["throughput"]] == list(r["settings"]["concurrency"])
    assert all(t["requests_per_s"] > 0 and t["tokens_per_s"] > 0 and t["our_cores"] > 0 for t in m["throughput"])
    assert all(b["tokens_per_s"] > 0 for b in m["baseline_batches"])
    mem = m["memory"]
    assert mem["server_peak_rss_mib"] > 0 and mem["transformers_peak_rss_mib"] > 0 and mem["in_process_peak_rss_mib"] > 0
    assert any(k.startswith("stub:blip2") for k in mem["server_peak_rss_by_process_mib"])
    assert "skipped" in m["perf_analyzer"]
    # int8 weights run in the same turns; the floor and the throughput bound are derived
    assert positive(m["end_to_end"]["caption"]["in_process_int8"]["latency_ms"])
    assert m["int8_agreement"]["compared"] > 0 and m["floor_int8"]["floor_ms"] > 0
    assert m["decoder_weights_int8"]["bytes_read_per_step"] < m["decoder_weights"]["bytes_read_per_step"]
    assert m["throughput_bound"]["bound_requests_per_s"] > 0
    # the decode step next to a bandwidth probe of its own, round by round, for fp32 and int8
    side = m["floor_side_by_side"]
    assert set(side) == {"in_process", "in_process_int8"}
    assert all(r["rounds"] == 3 and 0 < r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"] for r in side.values())


@pytest.mark.server
@pytest.mark.slow
def test_graph_flops_match_the_architecture(results):
    """The FLOPs counted on the exported graphs equal the textbook count from the config: ViT
    (patch convolution, 4 projections + MLP per layer, QK^T and AV over every token) and the OPT
    prefill (projections + MLP per position and layer, the LM head at the last position only,
    full attention over the query embeddings and the prompt)."""
    _, r = results
    m = r["models"]["tiny-opt"]
    config = json.loads((Path(m["model"]["checkpoint"]) / "config.json").read_text())
    v, t = config["vision_config"], config["text_config"]
    vision = m["graph_costs"]["vision_encoder"]["flops_by_op"]
    patch, width, layers = v["patch_size"], v["hidden_size"], v["num_hidden_layers"]
    tokens = (v["image_size"] // patch) ** 2 + 1
    assert vision["Conv"] == 2 * (tokens - 1) * width * 3 * patch * patch
    assert vision["MatMul"] == layers * (2 * tokens * (4 * width**2 + 2 * width * v["intermediate_size"])
                                         + 4 * tokens**2 * width)
    h, layers = t["hidden_size"], t["num_hidden_layers"]
    assert t.get("word_embed_proj_dim", h) == h  # else project_in/out add two matmuls
    for w in m["workloads"]:
        cost = m["graph_costs"][f"prefill:{w['name']}"]
        positions = config["num_query_tokens"] + cost["shapes"]["input_ids"][1]
        linear = 2 * positions * layers * (4 * h * h + 2 * h * t["ffn_dim"]) + 2 * h * t["vocab_size"]
        assert cost["flops_by_op"]["MatMul"] + cost["flops_by_op"]["Gemm"] == linear
        assert cost["flops_by_op"]["GroupQueryAttention"] == 4 * positions**2 * h * layers


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-opt", "tiny-t5"])
def test_generated_tokens_are_identical_to_transformers(results, model):
    _, r = results
    ident = r["models"][model]["tokens_identical"]
    assert ident["compared"] > 0
    assert ident["all"], ident["mismatches"]
    assert ident["distinct_tokens_in_reference"] > 1


@pytest.mark.server
@pytest.mark.slow
def test_table_and_plots_are_written(results):
    out, _ = results
    assert "| workload | system |" in (out / "bench.md").read_text()
    assert "## Models side by side" in (out / "bench.md").read_text()
    for model in ("tiny-opt", "tiny-t5"):
        for kind in ("stages", "throughput", "vs_transformers"):
            png = out / f"{model}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.server
@pytest.mark.slow
def test_decode_floor_counts_what_the_step_reads(results):
    """The decode step's floor counts the decoder's weights and every cached key and value it reads:
    the self-attention cache for both families, and T5's cross-attention keys and values over the
    query embeddings and the prompt (2 x layers x heads x width x 4 bytes per position)."""
    _, r = results
    for name, m in r["models"].items():
        config = json.loads((Path(m["model"]["checkpoint"]) / "config.json").read_text())
        t = config["text_config"]
        step = m["graph_costs"]["decode_step"]
        past = m["stages"]["decode_step_past_length"]
        if t["model_type"] == "t5":
            heads, layers, head = t["num_heads"], t["num_decoder_layers"], t["d_kv"]
        else:
            heads, layers, head = t["num_attention_heads"], t["num_hidden_layers"], t["hidden_size"] // t["num_attention_heads"]
        width = -(-head // 8) * 8  # the cache's heads are padded to a multiple of 8
        assert step["input_bytes_read"]["max_sequence_length"] == 2 * layers * heads * past * width * 4, name
        assert m["floor"]["bytes_read"] == step["weight_bytes_read"] + sum(step["input_bytes_read"].values())
        prefill = m["graph_costs"]["prefill:caption"]
        if t["model_type"] == "t5":
            encoded = step["dims"]["encoder_sequence_length"]
            assert encoded == config["num_query_tokens"] + 1  # the caption's prompt is "</s>"
            assert step["input_bytes_read"]["encoder_sequence_length"] == 2 * layers * heads * encoded * t["d_kv"] * 4
            assert list(prefill["parts"]) == ["llm_encoder", "llm_decoder"]
            assert past == 1 + m["workloads"][0]["max_new_tokens"] // 2
        else:
            assert "encoder_sequence_length" not in step["input_bytes_read"] and "parts" not in prefill
            assert past == config["num_query_tokens"] + 1 + m["workloads"][0]["max_new_tokens"] // 2


def test_committed_results_read_back_unchanged():
    """Old bench.json files stay readable: the records rebuild the committed one key for key, and
    the report renders it."""
    committed = json.loads((ROOT / "benchmarks" / "results" / "bench.json").read_text())
    bench = records.BenchResults.from_dict(committed)
    assert json.loads(json.dumps(bench.to_dict())) == committed
    assert "### Decode step vs the floor" in markdown(committed)


def test_every_record_field_is_documented_and_the_readme_shows_the_schema():
    for cls in records.records():
        documented = [k for k, _, _ in records.field_docs(cls)]
        assert documented == [f.name for f in fields(cls)], cls.__name__
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    assert records.schema_markdown() in readme, "benchmarks/README.md: rerun python -m blip2_triton.benchmarks.records"


def test_quantized_agreement_runs_and_counts(tmp_path):
    """`python -m blip2_triton.benchmarks.quantized` on the tiny OPT model, one pass: fp32, int8 and
    int4 answer every request, agreement is counted against fp32, and the JSON and table are written."""
    from blip2_triton.benchmarks import quantized

    assert quantized.agreement([[1, 2, 3], [1, 5, 3]], [[1, 2, 3], [1, 2, 3]]) == {
        "compared": 2, "identical": 1, "mean_agreeing_prefix": 0.6667}
    out = tmp_path / "q.json"
    assert quantized.main(["--model", "tiny-opt", "--images", "2", "--reps", "1", "--workdir", str(tmp_path / "work"),
                           "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    for w in result["workloads"].values():
        assert set(w["latency_ms_p50"]) == {"fp32", "int8", "int4"}
        assert all(len(t) == 2 and all(len(r) == w["max_new_tokens"] for r in t) for t in w["tokens"].values())
        assert {q: a["compared"] for q, a in w["agreement_with_fp32"].items()} == {"int8": 2, "int4": 2}
    assert result["decoder_bytes"]["int4"] < result["decoder_bytes"]["int8"] < result["decoder_bytes"]["fp32"]
