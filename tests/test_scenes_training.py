"""Generated scenes, the BLIP-2 training loss layout, the metric code and the bundled trained model."""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_triton.toy.config import TrainConfig
from blip2_triton.toy.dataset import (
    IGNORE_INDEX, SceneDataset, encode_encoder_decoder_example, encode_example, prefix_split,
)
from blip2_triton.toy.embedded import TRAINED_MODELS
from blip2_triton.toy.evaluation import CAPTION, GenerateAnswerer, eval_items, evaluate, normalize
from blip2_triton.toy.losses import lm_loss
from blip2_triton.toy.model import build_model_and_processor, copy_image_stages
from blip2_triton.toy.presets import TinyPreset
from blip2_triton.toy.scenes import (
    HELDOUT_SEED, OBJECT_COLORS, QA_KINDS, SHAPES, SceneObject, caption_for, generate_scenes, make_scene,
)
from blip2_triton.toy.tokenizer import IMAGE_TOKEN
from blip2_triton.toy.train import train

ASSETS = Path(__file__).resolve().parents[1] / "src" / "blip2_triton" / "assets"
SAMPLES_DIR = ASSETS / "samples"
OBJECT = re.compile(r"an? (\w+) (\w+)")


# --- dataset -------------------------------------------------------------------------------------

def test_same_seed_same_pixels_and_text():
    a, b = generate_scenes(12, seed=123), generate_scenes(12, seed=123)
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes()
        assert (x.caption, x.qa, x.objects) == (y.caption, y.qa, y.objects)
    other = generate_scenes(12, seed=124)
    assert [s.image.tobytes() for s in a[1:]] == [s.image.tobytes() for s in other[:-1]]  # scene i = seed + i
    assert a[0].image.tobytes() != other[0].image.tobytes()


def test_captions_list_objects_left_to_right():
    for scene in generate_scenes(200, seed=HELDOUT_SEED):
        objs = sorted(scene.objects, key=lambda o: o.x)
        # horizontal extents are disjoint, so "left to right" is a strict order
        assert all(a.right < b.left for a, b in zip(objs, objs[1:]))
        assert OBJECT.findall(scene.caption) == [(o.color, o.shape) for o in objs]
        assert len({(o.color, o.shape) for o in objs}) == len(objs)
        assert scene.image.size == (64, 64) and scene.image.mode == "RGB"


def test_caption_rule_on_hand_built_objects():
    red = SceneObject("circle", "red", 40, 10, 12)
    orange = SceneObject("square", "orange", 10, 30, 12)
    blue = SceneObject("triangle", "blue", 55, 50, 12)
    assert caption_for([red]) == "a red circle"
    assert caption_for([red, orange]) == "an orange square and a red circle"
    assert caption_for([blue, red, orange]) == "an orange square, a red circle and a blue triangle"


def test_questions_have_their_true_answers():
    kinds = set()
    for scene in generate_scenes(200, seed=7):
        by_name = {o.name: o for o in scene.objects}
        for qa in scene.qa:
            kinds.add(qa.kind)
            assert qa.prompt == f"Question: {qa.question} Answer:"
            if qa.kind == "color":
                shape = re.fullmatch(r"what color is the (\w+)\?", qa.question)[1]
                assert [o.color for o in scene.objects if o.shape == shape] == [qa.answer]
            elif qa.kind == "shape":
                color = re.fullmatch(r"what shape is the (\w+) object\?", qa.question)[1]
                assert [o.shape for o in scene.objects if o.color == color] == [qa.answer]
            elif qa.kind == "count":
                m = re.fullmatch(r"how many (\w+?)s are there\?", qa.question)
                n = len(scene.objects) if m[1] == "shape" else sum(o.shape == m[1] for o in scene.objects)
                assert qa.answer == ("zero", "one", "two", "three")[n]
            else:
                a, b = re.fullmatch(r"is the (\w+ \w+) left or right of the (\w+ \w+)\?", qa.question).groups()
                assert qa.answer == ("left" if by_name[a].x < by_name[b].x else "right")
    assert kinds == set(QA_KINDS)


# --- training loss layout ------------------------------------------------------------------------

# Minuscule presets of both families.
MICRO = {
    "opt": TinyPreset(image_size=64, patch_size=16, num_query_tokens=4, text_hidden=32, max_position_embeddings=64),
    "t5": TinyPreset(family="t5", image_size=64, patch_size=16, num_query_tokens=4, text_hidden=32, d_kv=8, ffn_dim=64,
                     initializer_factor=1.0),
}


@functools.lru_cache(maxsize=None)
def micro(family: str = "opt"):
    """A minuscule preset of `family`, its fresh model and processor."""
    model, processor = build_model_and_processor(MICRO[family], seed=0)
    return MICRO[family], model, processor


def test_labels_only_on_target_and_eos():
    preset, model, processor = micro("opt")
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_token_index == image_id
    q = preset.num_query_tokens

    ids, labels = encode_example(tok, q, image_id, "", "a red circle")
    assert ids[:q] == [image_id] * q and ids[q] == 2 and ids[-1] == 2
    assert labels[: q + 1] == [IGNORE_INDEX] * (q + 1) and labels[q + 1 :] == ids[q + 1 :]
    assert tok.decode(ids[q + 1 : -1]) == "a red circle"

    prompt = "Question: what color is the circle? Answer:"
    ids, labels = encode_example(tok, q, image_id, prompt, "red")
    n_prompt = len(tok(prompt).input_ids)
    assert labels[: q + n_prompt] == [IGNORE_INDEX] * (q + n_prompt)
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == " red</s>"


def test_t5_encoder_reads_the_processors_ids_and_its_decoder_the_target():
    """The encoder's ids are `processor(images, text=prompt)`'s, captions included (prompt "": image
    tokens + </s>, what the served code and the reference both use); the labels are the target + </s>."""
    preset, model, processor = micro("t5")
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_token_index == image_id and not model.config.use_decoder_only_language_model
    image = generate_scenes(1, 0)[0].image
    for prompt, target in [("", "a red circle and a blue square"), ("Question: what color is the circle? Answer:", "red")]:
        ids, labels = encode_encoder_decoder_example(tok, preset.num_query_tokens, image_id, prompt, target)
        assert ids == processor(images=image, text=prompt).input_ids[0]
        assert labels[-1] == tok.eos_token_id and tok.decode(labels) == f"{target}</s>"
    assert encode_encoder_decoder_example(tok, 4, image_id, "", "a")[0] == [image_id] * 4 + [tok.eos_token_id]


def test_t5_prefix_lm_examples_split_the_caption():
    """BLIP-2's prefix LM for Flan-T5: the encoder reads the caption's first words, the decoder
    learns the rest; `prefix_fraction` swaps captions for them (encoder-decoder datasets only)."""
    preset, _, processor = micro("t5")
    tok = processor.tokenizer
    dataset = SceneDataset(16, 0, processor, preset.num_query_tokens, encoder_decoder=True)
    for scene, (i, ids, labels) in zip(generate_scenes(16, 0), dataset.prefixed):
        prefix, suffix = prefix_split(scene)
        assert f"{prefix} {suffix}" == scene.caption and prefix and suffix
        assert ids == processor(images=scene.image, text=prefix).input_ids[0]
        assert tok.decode(labels, skip_special_tokens=True) == suffix
    batch = dataset.batch(8, 0.5, torch.Generator().manual_seed(0), shared_images=True, prefix_fraction=1.0)
    prefixed = [ids for _, ids, _ in dataset.prefixed]
    assert all(batch["input_ids"][r, : batch["attention_mask"][r].sum()].tolist() in prefixed for r in range(4))
    with pytest.raises(ValueError, match="encoder-decoder"):
        SceneDataset(4, 0, micro("opt")[2], 4).batch(4, 0.5, torch.Generator(), prefix_fraction=0.5)


@pytest.mark.parametrize("family", MICRO)
def test_shared_image_batch_loss_equals_the_model_forward(family):
    preset, model, processor = micro(family)
    dataset = SceneDataset(32, 0, processor, preset.num_query_tokens, encoder_decoder=family == "t5")
    batch = dataset.batch(12, 0.5, torch.Generator().manual_seed(0), shared_images=True)
    assert batch["pixel_values"].shape[0] == 6 and batch["input_ids"].shape[0] == 12
    index = batch["image_index"]
    # every VQA example is about the scene of a caption in the same batch
    image_token = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (index[:6] == torch.arange(6)).all() and (index[6:] == torch.arange(6)).all()
    assert dataset.captions[0][1][0] == image_token
    full = {k: v for k, v in batch.items() if k not in ("image_index", "slots", "order", "answer")} | {"pixel_values": batch["pixel_values"][index]}
    model.eval()
    with torch.no_grad():
        assert lm_loss(model, batch).item() == pytest.approx(model(**full).loss.item(), rel=1e-5)


def test_order_targets_name_each_objects_shape_word_and_rank():
    """The order loss's targets: for a position question, each named object's shape word and its
    rank left to right; no targets for the other kinds."""
    preset, _, processor = micro("t5")
    tok = processor.tokenizer
    dataset = SceneDataset(24, 0, processor, preset.num_query_tokens, encoder_decoder=True)
    scenes = generate_scenes(24, 0)
    qas = [(scene, qa) for scene in scenes for qa in scene.qa]
    assert any(qa.kind == "position" for _, qa in qas)
    for (scene, qa), (_, ids, _), order in zip(qas, dataset.vqa, dataset.vqa_order):
        if qa.kind != "position":
            assert order == []
            continue
        words = [tok.decode(ids[: pos + 1]).split()[-2:] for pos, _ in order]
        named = [" ".join(w) for w in words]
        ranks = {o.name: k for k, o in enumerate(scene.objects)}
        assert sorted(named) == sorted(re.findall(r"the (\w+ \w+)", qa.question))
        assert [ranks[n] for n in named] == [rank for _, rank in order]
    batch = dataset.batch(12, 0.5, torch.Generator().manual_seed(0), shared_images=True)
    for row, pos, rank in batch["order"].tolist():
        assert row >= 6 and batch["input_ids"][row, pos].item() in {tok(s).input_ids[0] for s in SHAPES}


def test_answer_targets_are_the_position_answers_at_the_prompts_last_token():
    """The answer loss's targets: every position question of a batch, and only those, with its
    answer; the token it is read at (the last attended one) is the prompt's </s>."""
    preset, _, processor = micro("t5")
    tok = processor.tokenizer
    dataset = SceneDataset(24, 0, processor, preset.num_query_tokens, encoder_decoder=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = dataset.batch(16, 0.5, g, shared_images=True, qa_weights={"position": 4.0})
        rows = {row: answer for row, answer in batch["answer"].tolist()}
        assert rows
        for row in range(8, 16):
            prompt = tok.decode(batch["input_ids"][row], skip_special_tokens=True)
            target = tok.decode(batch["labels"][row][batch["labels"][row] >= 0], skip_special_tokens=True)
            assert ("left or right of" in prompt) == (row in rows)
            if row in rows:
                assert target == ("left", "right")[rows[row]]
        last = batch["attention_mask"].sum(1) - 1
        assert (batch["input_ids"][torch.arange(16), last] == tok.eos_token_id).all()


def test_qa_weights_draw_the_weighted_kind_more_often():
    preset, _, processor = micro("t5")
    dataset = SceneDataset(64, 0, processor, preset.num_query_tokens, encoder_decoder=True)

    def position_share(weights):
        g = torch.Generator().manual_seed(0)
        rows = [dataset.batch(32, 0.5, g, shared_images=True, qa_weights=weights)["order"] for _ in range(20)]
        return sum(len(set(r[:, 0].tolist())) for r in rows) / (20 * 16)

    assert position_share({"position": 8.0}) > position_share(None) + 0.2
    with pytest.raises(ValueError, match="shared_images"):
        dataset.batch(8, 0.5, torch.Generator(), qa_weights={"position": 2.0})


def test_slot_targets_list_objects_left_to_right():
    preset, _, processor = micro("opt")
    dataset = SceneDataset(16, 0, processor, preset.num_query_tokens)
    colors = list(OBJECT_COLORS)
    for scene, slots in zip(generate_scenes(16, 0), dataset.slots.tolist()):
        named = [(SHAPES[s], colors[c]) for s, c in slots if s < len(SHAPES)]
        assert named == [(o.shape, o.color) for o in sorted(scene.objects, key=lambda o: o.x)]
        assert slots[len(named):] == [[len(SHAPES), len(colors)]] * (3 - len(named))


def test_auxiliary_stage_and_heads_stay_out_of_the_checkpoint():
    preset, _, processor = micro("opt")
    cfg = TrainConfig(steps=3, stage1_steps=2, batch_size=8, warmup_steps=1, train_scenes=16, preset=preset, threads=2,
                      shape_count_aux=True)
    model, _ = build_model_and_processor(preset, seed=0)
    keys = set(model.state_dict())
    dataset = SceneDataset(cfg.train_scenes, 0, processor, preset.num_query_tokens)
    _, _, losses, aux_losses, _ = train(cfg, progress=False, model=model, processor=processor, dataset=dataset)
    torch.use_deterministic_algorithms(False)
    assert len(losses) == 3 and len(aux_losses) == 5  # LM loss only after the auxiliary-only stage
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("family", MICRO)
def test_training_loop_reduces_loss(family):
    preset, _, processor = micro(family)
    cfg = TrainConfig(steps=25, batch_size=16, lr=3e-3, warmup_steps=3, train_scenes=64, preset=preset, threads=2,
                      stage1_steps=0, shared_images=False, aux_weight=0.0)  # the LM loss alone
    model, _ = build_model_and_processor(preset, seed=0)
    dataset = SceneDataset(cfg.train_scenes, 0, processor, preset.num_query_tokens, encoder_decoder=family == "t5")
    _, _, losses, _, _ = train(cfg, progress=False, model=model, processor=processor, dataset=dataset)
    torch.use_deterministic_algorithms(False)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_order_and_answer_losses_train_with_the_lm_loss_and_stay_out_of_the_checkpoint():
    preset, _, processor = micro("t5")
    cfg = TrainConfig(steps=3, stage1_steps=0, batch_size=8, warmup_steps=1, train_scenes=16, preset=preset, threads=1,
                      aux_weight=1.0, slot_aux=False, shape_count_aux=False, order_aux=True, answer_aux=True,
                      qa_weights={"position": 4.0})
    model, _ = build_model_and_processor(preset, seed=0)
    keys = set(model.state_dict())
    dataset = SceneDataset(cfg.train_scenes, 0, processor, preset.num_query_tokens, encoder_decoder=True)
    _, _, losses, aux_losses, _ = train(cfg, progress=False, model=model, processor=processor, dataset=dataset)
    torch.use_deterministic_algorithms(False)
    assert len(losses) == 3 and 1 <= len(aux_losses) <= 3 and all(0 < a < 5 for a in aux_losses)
    assert set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="family t5"):
        train(dataclasses.replace(cfg, preset=MICRO["opt"]), progress=False)


def test_pointer_loss_reads_the_first_steps_attention_on_the_named_objects():
    """The pointer loss: head heads[0] of the decoder's first cross-attention layer at its first
    step on the first-named object's shape word, heads[1] on the second's; attention all there
    gives 0, and the loop trains it with the LM loss (eager attention: sdpa returns no weights)."""
    from blip2_triton.toy.losses import first_step_cross_attention, pointer_loss

    order = torch.tensor([[0, 5, 1], [0, 9, 0], [2, 4, 2], [2, 7, 1]])
    uniform = torch.full((3, 4, 12), 1 / 12).log()
    assert pointer_loss(uniform, order, (2, 3)).item() == pytest.approx(np.log(12))
    attn = torch.full((3, 4, 12), 1e-6)
    attn[0, 2, 5] = attn[0, 3, 9] = attn[2, 2, 4] = attn[2, 3, 7] = 1.0
    assert pointer_loss(attn.log(), order, (2, 3)).item() == pytest.approx(0.0)
    attn[0, 2, 5], attn[0, 2, 9] = 1e-6, 1.0  # head 2 on the second-named object instead
    assert pointer_loss(attn.log(), order, (2, 3)).item() > 3

    # Its log-weights are the model's own first-step cross-attention weights, padding masked.
    preset, model, _ = micro("t5")
    model.language_model.set_attn_implementation("eager")
    emb = torch.randn(3, 10, preset.text_hidden)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    labels = torch.tensor([[5, 1], [6, 1], [7, 1]])
    lm, log_attention = first_step_cross_attention(model, emb, mask, labels)
    ref = model.language_model(inputs_embeds=emb, attention_mask=mask, labels=labels, output_attentions=True)
    torch.testing.assert_close(log_attention.exp(), ref.cross_attentions[0][:, :, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lm.loss, ref.loss)

    preset, _, processor = micro("t5")
    cfg = TrainConfig(steps=3, stage1_steps=0, batch_size=8, warmup_steps=1, train_scenes=16, preset=preset, threads=1,
                      aux_weight=1.0, slot_aux=False, shape_count_aux=False, pointer_aux=True,
                      qa_weights={"position": 4.0})
    model, _ = build_model_and_processor(preset, seed=0)
    dataset = SceneDataset(cfg.train_scenes, 0, processor, preset.num_query_tokens, encoder_decoder=True)
    _, _, losses, aux_losses, _ = train(cfg, progress=False, model=model, processor=processor, dataset=dataset)
    torch.use_deterministic_algorithms(False)
    assert len(losses) == 3 and 1 <= len(aux_losses) <= 3 and all(0 < a < 10 for a in aux_losses)
    with pytest.raises(ValueError, match="family t5"):
        train(dataclasses.replace(cfg, preset=MICRO["opt"]), progress=False)


def test_position_bias_lr_scale_moves_only_the_relative_position_tables_faster():
    """--position-bias-lr-scale: T5's relative-position bias tables (encoder and decoder) take
    steps that many times larger (Adam's step is about lr), every other weight the same."""
    preset, _, processor = micro("t5")
    dataset = SceneDataset(16, 0, processor, preset.num_query_tokens, encoder_decoder=True)

    def moved(scale):
        cfg = TrainConfig(steps=3, stage1_steps=0, batch_size=8, warmup_steps=1, train_scenes=16, preset=preset,
                          threads=1, aux_weight=0.0, lr=1e-4, position_bias_lr_scale=scale)
        model, _ = build_model_and_processor(preset, seed=0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(cfg, progress=False, model=model, processor=processor, dataset=dataset)
        torch.use_deterministic_algorithms(False)
        return {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}

    base, fast = moved(1.0), moved(30.0)
    tables = [n for n in base if "relative_attention_bias" in n]
    assert len(tables) == 2  # the encoder's and the decoder's
    for n in tables:
        assert fast[n] > 10 * base[n]
    assert fast["language_model.lm_head.weight"] == pytest.approx(base["language_model.lm_head.weight"], rel=0.5)


def test_a_continued_run_records_both_stages(tmp_path):
    """`--init-from` (the bundled model's stage 3): new weights, and a card and log that say how
    both runs were made, so the chain stays reproducible."""
    import json

    from blip2_triton.toy.train import train_main

    small = ["--batch-size", "8", "--train-scenes", "16", "--eval-scenes", "2", "--warmup-steps", "1",
             "--threads", "1", "--no-progress"]
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    train_main(["--output", str(first), "--stage1-steps", "1", "--steps", "2", *small])
    train_main(["--output", str(second), "--init-from", str(first), "--stage1-steps", "0", "--aux-weight", "0",
                "--steps", "3", "--caption-fraction", "0.25", *small])
    log = json.loads((second / "training_log.json").read_text())
    assert log["previous"]["config"]["steps"] == 2 and len(log["previous"]["losses"]) == 2 and len(log["losses"]) == 3
    card = (second / "README.md").read_text()
    assert "--output STAGE2_DIR" in card and "--init-from STAGE2_DIR" in card
    assert "stage 3, continued from those weights: 3 steps" in card and "25% captions" in card
    assert (second / "loss_curve.png").stat().st_size > 0
    a = (first / "model.safetensors").read_bytes()
    assert a != (second / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="itself continued"):
        train_main(["--output", str(third), "--init-from", str(second), "--stage1-steps", "0", "--aux-weight", "0",
                    "--steps", "1", *small])
    with pytest.raises(SystemExit, match="architecture differs"):
        train_main(["--output", str(third), "--init-from", str(first), "--patch-size", "16", "--stage1-steps", "0",
                    "--aux-weight", "0", "--steps", "1", *small])

def test_image_stages_come_from_the_given_checkpoint(tmp_path):
    """`--image-stages-from` (the T5 sibling starts from the OPT model's first stage): the vision
    tower, Q-Former and queries are the donor's, the rest is the fresh model's."""
    _, donor, processor = micro("opt")
    donor.save_pretrained(tmp_path / "opt")
    model, _ = build_model_and_processor(MICRO["t5"], seed=1)
    projection = model.language_projection.weight.clone()
    copy_image_stages(model, tmp_path / "opt")
    for part in ("vision_model", "qformer"):
        mine, theirs = getattr(model, part).state_dict(), getattr(donor, part).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), part
    assert torch.equal(model.query_tokens, donor.query_tokens)
    assert torch.equal(model.language_projection.weight, projection)
    other, _ = build_model_and_processor(dataclasses.replace(MICRO["t5"], qformer_hidden=48), seed=0)
    with pytest.raises(ValueError, match="image stages differ"):
        copy_image_stages(other, tmp_path / "opt")


def test_a_t5_run_writes_a_t5_card(tmp_path):
    from blip2_triton.toy.train import train_main

    small = ["--batch-size", "8", "--train-scenes", "16", "--eval-scenes", "2", "--warmup-steps", "1",
             "--threads", "1", "--no-progress", "--stage1-steps", "0", "--aux-weight", "0", "--steps", "2"]
    train_main(["--output", str(tmp_path / "opt"), *small])
    train_main(["--family", "t5", "--output", str(tmp_path / "t5"), "--image-stages-from", str(tmp_path / "opt"), *small])
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    assert config["text_config"]["model_type"] == "t5"
    card = (tmp_path / "t5" / "README.md").read_text()
    assert "A tiny BLIP-2 Flan-T5" in card and "out[:, 1:]" in card and "`opt` (BLIP-2's OPT and Flan-T5" in card
    assert "Flan-T5 encoder-decoder | d_model" in card and "OPT" not in card.split("## Architecture")[1]


# --- metric code ---------------------------------------------------------------------------------

def test_evaluate_counts_a_stub_answerer():
    scenes = generate_scenes(10, seed=HELDOUT_SEED)
    truth = {(it.scene_seed, it.prompt): it.expected for it in eval_items(scenes)}
    wrong_caption = scenes[0].seed
    wrong_count = next(s.seed for s in scenes if any(qa.kind == "count" for qa in s.qa))
    image_seed = {id(s.image): s.seed for s in scenes}

    def stub(image: Image.Image, prompt: str) -> str:
        seed = image_seed[id(image)]
        if seed == wrong_caption and prompt == "":
            return "a purple elephant"
        answer = truth[(seed, prompt)]
        if seed == wrong_count and prompt.startswith("Question: how many"):
            return "seven"
        return f"  {answer.upper()}. "  # normalisation: case, spaces, final period

    report = evaluate(scenes, stub)
    n_qa = {k: sum(qa.kind == k for s in scenes for qa in s.qa) for k in QA_KINDS}
    assert report.total == {CAPTION: 10, **n_qa}
    assert report.correct[CAPTION] == 9 and report.accuracy(CAPTION) == pytest.approx(0.9)
    assert report.correct["count"] == n_qa["count"] - 1
    for k in ("color", "shape", "position"):
        assert report.accuracy(k) == 1.0
    assert report.vqa_accuracy == pytest.approx((sum(n_qa.values()) - 1) / sum(n_qa.values()))
    assert {(m.kind, m.scene_seed) for m in report.misses} == {(CAPTION, wrong_caption), ("count", wrong_count)}
    assert "| caption exact match | 9 | 10 | 90.0% |" in report.table()

    class Batched:  # the batch path must give the same report
        def __call__(self, image, prompt):
            raise AssertionError("answer_batch should be used")

        def answer_batch(self, images, prompts):
            return [stub(i, p) for i, p in zip(images, prompts)]

    assert evaluate(scenes, Batched(), batch_size=7).to_dict() == report.to_dict()
    assert normalize(" Two.\n") == "two"


# --- the bundled trained checkpoints ------------------------------------------------------------

@pytest.fixture(scope="module", params=list(TRAINED_MODELS))
def bundled(request):
    """(family, directory, model, processor) of each bundled trained model."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    directory = TRAINED_MODELS[request.param]
    assert directory.parent == ASSETS
    model = Blip2ForConditionalGeneration.from_pretrained(directory)
    processor = AutoProcessor.from_pretrained(directory)
    return request.param, directory, model, processor


def _samples():
    return json.loads((SAMPLES_DIR / "samples.json").read_text())["samples"]


def test_bundled_checkpoint_files_and_config(bundled):
    family, directory, model, processor = bundled
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "processor_config.json", "README.md", "loss_curve.png", "training_log.json"):
        assert (directory / name).is_file(), name
    assert (directory / "model.safetensors").stat().st_size < 8e6
    assert model.config.text_config.model_type == family
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert processor.num_query_tokens == model.config.num_query_tokens
    gen = model.generation_config
    if family == "t5":  # Flan-T5's: the decoder starts from <pad>
        assert (gen.eos_token_id, gen.decoder_start_token_id, gen.pad_token_id, gen.max_new_tokens) == (1, 0, 0, 20)
        lm = model.language_model
        assert not torch.equal(lm.lm_head.weight, lm.shared.weight)  # untied, as Flan-T5's
    else:
        assert (gen.eos_token_id, gen.bos_token_id, gen.pad_token_id, gen.max_new_tokens) == (2, 2, 1, 20)
    assert len(_samples()) >= 2


def test_bundled_model_captions_the_samples(bundled):
    family, _, model, processor = bundled
    samples = _samples()
    images = [Image.open(SAMPLES_DIR / s["file"]).convert("RGB") for s in samples]
    for s, image in zip(samples, images):  # the PNGs are exactly the held-out scenes
        assert image.tobytes() == make_scene(s["seed"]).image.tobytes()

    # plain transformers generate, one image at a time: OPT captions with no text at all; T5 with
    # text="" (transformers cannot caption a T5 checkpoint without input_ids)
    for s, image in zip(samples, images):
        inputs = processor(images=image, **({"text": ""} if family == "t5" else {}), return_tensors="pt")
        out = model.generate(**inputs, generation_config=model.generation_config)
        text = processor.batch_decode(out, skip_special_tokens=True)[0].strip()
        assert text == s["caption"]
    assert {s["question"]["kind"] for s in samples} <= set(QA_KINDS)
    assert all(c in OBJECT_COLORS or c in SHAPES for s in samples for c in s["caption"].replace(",", "").split()
               if c not in ("a", "an", "and"))


def test_bundled_model_answers_the_samples(bundled):
    _, _, model, processor = bundled
    samples = _samples()
    images = [Image.open(SAMPLES_DIR / s["file"]).convert("RGB") for s in samples]
    answer = GenerateAnswerer(model, processor)
    got = answer.answer_batch(images * 2, [""] * len(images) + [s["question"]["prompt"] for s in samples])
    assert got == [s["caption"] for s in samples] + [s["question"]["answer"] for s in samples]


def test_precision_section_is_replaced_not_appended(tmp_path):
    from blip2_triton.toy.precision import SECTION, update_card

    report = {"num_scenes": 2, "accuracy": {"caption": 1.0, "color": 0.5, "shape": 1.0, "count": 1.0,
                                            "position": 1.0, "vqa_all": 0.9}}
    (tmp_path / "README.md").write_text("# card\n\n## Accuracy\n\ntable\n\n## Precision\n\nold numbers\n\n## Later\n\nkept\n")
    update_card(tmp_path, {"a": report, "b": report})
    update_card(tmp_path, {"a": report, "b": report})
    card = (tmp_path / "README.md").read_text()
    assert card.count(SECTION) == 1 and "old numbers" not in card
    assert "## Accuracy\n\ntable" in card and "## Later\n\nkept" in card
    assert "| VQA color | 50.0% | 50.0% |" in card


def test_cli_flags_of_the_t5_position_options():
    """--text-layers sets the language model's depth (T5: its encoder's) and nothing else;
    --position-lm-weight is T5-only."""
    from blip2_triton.toy.model import SCENES_PRESETS
    from blip2_triton.toy.train import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--family", "t5", "--text-layers", "4", "--answer-aux",
                                                      "--position-lm-weight", "3"]))
    assert cfg.preset == dataclasses.replace(SCENES_PRESETS["t5"], text_layers=4)
    assert cfg.answer_aux and cfg.position_lm_weight == 3.0 and not cfg.pointer_aux
    assert config_from_args(build_parser().parse_args(["--family", "t5", "--pointer-aux"])).pointer_aux
    assert config_from_args(build_parser().parse_args(["--family", "t5", "--position-bias-lr-scale", "50"])
                            ).position_bias_lr_scale == 50.0
    with pytest.raises(SystemExit, match="position-bias-lr-scale"):
        config_from_args(build_parser().parse_args(["--position-bias-lr-scale", "50"]))
    assert config_from_args(build_parser().parse_args(["--family", "t5"])).preset == SCENES_PRESETS["t5"]
    with pytest.raises(SystemExit, match="position-lm-weight"):
        config_from_args(build_parser().parse_args(["--position-lm-weight", "2"]))
