"""The decoder's in-place KV cache: the graph writes only the new positions, the engine keeps its
sequences packed in one cache, and the GroupQueryAttention decoder computes what transformers does."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from blip2_triton import repository, specs
from blip2_triton.serving.kv_cache import KVCache

from .conftest import random_image, run_together


@pytest.fixture(scope="module")
def decoder(pipeline):
    """tiny-opt's language model: its steps run the decoder graph over the in-place cache."""
    return pipeline.generator.language_model


def test_a_decode_step_writes_only_each_rows_next_position(decoder):
    cache = decoder.new_cache(slots=3, capacity=16)
    rng = np.random.default_rng(0)
    for b in cache.buffers:
        b[...] = rng.standard_normal(b.shape)
    before = [b.copy() for b in cache.buffers]
    lengths = np.array([5, 9, 2])  # cached positions per row
    decoder.step(np.array([4, 5, 6]), lengths, cache)
    for old, new in zip(before, cache.buffers):
        for row, length in enumerate(lengths):
            changed = np.flatnonzero(np.any(old[row] != new[row], axis=(0, 2)))
            assert changed.tolist() == [length], f"row {row} changed positions {changed.tolist()}"


def test_rows_of_a_step_see_only_their_own_length(decoder):
    """A row's logits do not depend on what other rows or the positions past its length hold."""
    rng = np.random.default_rng(1)
    cache = decoder.new_cache(slots=2, capacity=12)
    for b in cache.buffers:
        b[...] = rng.standard_normal(b.shape)
    alone = decoder.new_cache(slots=1, capacity=7)
    for shared, single in zip(cache.buffers, alone.buffers):
        single[0, :, :6] = shared[0, :, :6]
    together = decoder.step(np.array([7, 8]), np.array([6, 10]), cache)
    by_itself = decoder.step(np.array([7]), np.array([6]), alone)
    np.testing.assert_allclose(together[0], by_itself[0], rtol=1e-5, atol=1e-5)


def test_cache_growth_and_moves_keep_contents():
    cache = KVCache(layers=2, heads=2, head_dim=8, dtype=np.float32, slots=1, capacity=4)
    cache.buffers[0][0, :, :4] = 1.0
    cache.reserve(slots=3, capacity=9)
    assert (cache.slots, cache.capacity) == (3, 9)
    assert np.all(cache.buffers[0][0, :, :4] == 1.0) and np.all(cache.buffers[0][0, :, 4:] == 0)
    cache.reserve(slots=4, capacity=10)
    assert (cache.slots, cache.capacity) == (6, 18)  # doubling
    for slot in range(4):
        cache.buffers[1][slot] = slot
    cache.move(source=2, target=1, rows=2, length=18)  # overlapping ranges
    assert [cache.buffers[1][s, 0, 0, 0] for s in range(4)] == [0, 2, 3, 3]
    cache.gather(start=0, parents=np.array([1, 1, 0]), length=18)
    assert [cache.buffers[1][s, 0, 0, 0] for s in range(3)] == [2, 2, 0]
    assert cache.rows(1, 3)[0].flags.c_contiguous


def test_sequences_leaving_at_different_steps_keep_the_others_tokens(pipeline):
    """Short and long requests share steps; every departure moves the others down in the cache."""
    lengths = [3, 12, 1, 7, 12, 2]
    jobs = [(random_image(20 + i), "a photo of" if i % 2 else "", {"max_new_tokens": n, "min_new_tokens": n})
            for i, n in enumerate(lengths)]
    alone = [pipeline(image, prompt, **c).token_ids for image, prompt, c in jobs]

    together, engine = run_together(pipeline, jobs)
    assert together == alone
    assert [len(r) for r in alone] == lengths
    assert engine.cache.slots == 1, "an idle engine gives its cache memory back"


def _narrow_head_model():
    from transformers import Blip2ForConditionalGeneration

    from blip2_triton.toy.presets import TinyPreset, blip2_config

    torch.manual_seed(0)
    config = blip2_config(TinyPreset(text_hidden=20, text_heads=5), vocab_size=60, image_token_index=59)
    config.text_config._attn_implementation = "eager"
    return Blip2ForConditionalGeneration(config).eval()


def test_decoder_logits_equal_transformers_for_a_head_width_gqa_cannot_take(tmp_path):
    """Heads 4 wide are zero-padded to 8 in the cache; the exported graph still passes the gate and
    its PyTorch twin gives transformers' own logits, at prefill and at a cached step."""
    from blip2_triton.export.families import family_graphs
    from blip2_triton.export.onnx_io import export_module
    from blip2_triton.export.validate import check_graph

    model = _narrow_head_model()
    assert specs.kv_head_dim(model.config) == 8
    graph = family_graphs(model)[2]
    path = export_module(graph.module, graph.spec, graph.sample(graph.trace_axes), tmp_path / "decoder.onnx",
                         graph.custom_opsets)
    checks = check_graph(graph, path)
    assert checks and all(c.ok for c in checks), [str(c) for c in checks if not c.ok]

    lm = model.language_model
    prefix = torch.randn(1, 4, 20)
    ids = torch.tensor([[2, 10, 11, 12]])
    past = [torch.zeros(1, 5, 12, 8) for _ in range(2 * len(lm.model.decoder.layers))]
    with torch.no_grad():
        logits, *present = graph.module(ids[:, :3], prefix, torch.ones(1, 7, dtype=torch.long), *past)
        step, *_ = graph.module(ids[:, 3:], prefix[:, :0], torch.ones(1, 8, dtype=torch.long), *present)
        embeds = torch.cat([prefix, lm.get_input_embeddings()(ids)], dim=1)
        expected = lm(inputs_embeds=embeds).logits
    torch.testing.assert_close(logits[:, -1], expected[:, 6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step[:, -1], expected[:, 7], rtol=1e-4, atol=1e-4)


def test_generate_refuses_to_share_a_running_engine(pipeline):
    """The cache belongs to one thread: a synchronous generate() beside the loop would corrupt it."""
    from blip2_triton.serving.engine import Engine

    pixels, prompt_ids = pipeline.stages.preprocess(random_image(30), b"")
    request = pipeline.generator.request(pipeline.stages.query_embeds(pixels), prompt_ids, {})
    engine = Engine(pipeline.generator.language_model).start()
    try:
        with pytest.raises(RuntimeError, match="submit"):
            engine.generate(request)
    finally:
        engine.stop()
