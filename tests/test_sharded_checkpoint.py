"""toy.sharded: a checkpoint written shard by shard loads through from_pretrained equal to the
modules it was written from, with the keys save_pretrained writes."""
import json

import torch
from safetensors import safe_open

from blip2_triton.toy import presets
from blip2_triton.toy.sharded import build_sharded_checkpoint, materialized_modules


def test_sharded_checkpoint_loads_equal_to_its_modules(tmp_path, monkeypatch):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    out = build_sharded_checkpoint(tmp_path / "sharded", "tiny-opt", seed=3, shard_bytes=40_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3  # several shards, so loading across them is exercised

    config = Blip2Config.from_pretrained(out)
    expected = {k: v for _, tensors in materialized_modules(config, seed=3) for k, v in tensors.items()}
    loaded = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    state = loaded.state_dict()
    assert set(expected) <= set(state)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    # Nothing of the loaded model was left to transformers' random init: every tensor it holds is
    # one written here, or the LM head tied to the token embedding.
    assert set(state) - set(expected) == {"language_model.lm_head.weight"}
    assert loaded.language_model.lm_head.weight.data_ptr() == loaded.language_model.get_input_embeddings().weight.data_ptr()
    # The keys are those save_pretrained writes for the same preset.
    reference = presets.build_tiny_checkpoint(tmp_path / "whole", "tiny-opt")
    with safe_open(str(reference / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(index["weight_map"])
    # Another seed gives other weights.
    other = {k: v for _, t in materialized_modules(config, seed=4) for k, v in t.items()}
    assert not torch.equal(other["language_model.model.decoder.layers.0.fc1.weight"],
                           expected["language_model.model.decoder.layers.0.fc1.weight"])


def test_bfloat16_shards_widen_exactly(tmp_path):
    from transformers import Blip2ForConditionalGeneration

    out = build_sharded_checkpoint(tmp_path / "bf16", "tiny-opt", dtype="bfloat16", progress=False)
    loaded = Blip2ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    weight = loaded.language_model.model.decoder.layers[0].fc1.weight
    assert weight.dtype == torch.float32 and torch.equal(weight, weight.bfloat16().float())
    assert weight.std() > 0
