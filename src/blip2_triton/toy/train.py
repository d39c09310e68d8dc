"""Train the embedded default model: a tiny BLIP-2 OPT that captions and answers generated scenes.

The model is the standard `Blip2ForConditionalGeneration` built from `Blip2Config` (every part
trainable), sized by `SCENES_PRESET`; the tokenizer and processor come from `blip2_triton.tiny`.
Training data are `blip2_triton.scenes` scenes from seeds `[TRAIN_SEED, TRAIN_SEED + n)`; the
evaluation that ends a run uses the disjoint held-out range starting at `HELDOUT_SEED`.

The language-model loss is BLIP-2's: each sequence is

    <image> x num_query_tokens, </s> (BOS), prompt tokens, target tokens, </s> (EOS), <pad>...

and labels are -100 everywhere except on the target tokens and the EOS. Captioning examples have
an empty prompt (target = caption), VQA examples the prompt "Question: {q} Answer:" (target =
the one-word answer).

    python -m blip2_triton.training --output src/blip2_triton/assets/blip2-tiny-scenes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from blip2_triton.scenes import (
    HELDOUT_SEED, IMAGE_SIZE, MAX_OBJECTS, OBJECT_COLORS, QA_KINDS, SHAPES, TRAIN_SEED, generate_scenes,
)
from blip2_triton.tiny import IMAGE_TOKEN, TinyPreset, blip2_config, build_processor, build_tokenizer

IGNORE_INDEX = -100
BOS_ID, PAD_ID, EOS_ID = 2, 1, 2
DEFAULT_OUTPUT = Path(__file__).parent / "assets" / "blip2-tiny-scenes"
# What the embedded default is meant to reach on 200 held-out scenes.
CAPTION_TARGET, VQA_TARGET = 0.90, 0.95

# The embedded default's sizes: ~1.6M parameters, a ~6.5 MB float32 safetensors file.
# 8-pixel patches (8 x 8 of them): a ViT trained as a shape classifier learned shapes far faster
# with them than with 16-pixel patches (see TrainConfig).
SCENES_PRESET = TinyPreset(
    image_size=IMAGE_SIZE,
    patch_size=8,
    vision_hidden=128,
    vision_layers=3,
    vision_heads=4,
    qformer_hidden=96,
    qformer_layers=2,
    qformer_heads=4,
    num_query_tokens=8,
    text_hidden=128,
    text_layers=3,
    text_heads=4,
    max_position_embeddings=64,
    # transformers' 0.02, not the wide init the random tiny presets use for parity tests: trained
    # from 0.3 the attention saturates and the model never learns shapes from the image.
    init_std=0.02,
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the code, it determines the weights).

    The defaults reproduce the bundled checkpoint.

    Why shapes stayed at chance with the LM loss alone (patch 16, init 0.02, 2000 steps; the
    previous default): the LM's loss on shape tokens was ln 3 exactly, images shuffled within a
    batch raised the loss from 0.39 to 2.19 (colors and order were read), and linear / MLP probes
    on the trained vision tokens and query outputs of single-object scenes separated the three
    shapes no better than chance (36-41% held out): the vision tower never learned shapes. The
    same ViT trained directly as a shape classifier on single-object scenes (600 steps, lr 1e-3)
    reached 41% held out at patch 16 / init 0.02, 73% at init 0.1, 70% at init 0.2, and 92% at
    patch 8 / init 0.1: the 0.02 init and 16-pixel patches are what made shapes slow. In the full
    model, 600-step pilots (100 scenes) stayed at chance even with patch 8, init 0.1 and an
    auxiliary loss added to the LM loss from step 0 (slot head, or shape counts, or both); what
    broke the plateau was an auxiliary-only first stage (BLIP-2's two stages in miniature):
    800 + 600 steps: shape 70%, caption 30%; 1500 + 600: shape 69%, caption 36%. Full runs (200
    scenes): 2000 + 2500 steps (1047 s): caption 78.0%, VQA color 63.6%, shape 77.0%, count 95.0%,
    position 72.8%; 2000 + 4500 steps (1467 s, the defaults): caption 96.5%, color 72.3%, shape
    79.1%, count 99.5%, position 90.1%. The questions that pick an object by its color or shape
    lag the captions; with 35% captions instead of 50% (2000 + 2500) the run was stopped unfinished.
    A per-query slot head (`--slot-per-query`, 1000 + 3000 steps) trailed that run's LM loss at
    the same LM step and was stopped.

    Measured before (200 held-out scenes unless noted), none past the shape plateau (loss
    ~0.39-0.41): `--patch-size 8 --lr 2e-3 --warmup-steps 200 --qformer-dropout 0 --shared-images
    --steps 2500` (976 s): caption 10.5%, VQA 50.2%, shape 29.4%; the same with `--patch-size 16
    --steps 4000` (987 s): caption 11.5%, VQA 51.6%, shape 33.2%. 500-step pilots (100 scenes, lr
    2e-3, no dropout): 16 queries, lr 3e-3 and batch 32 (1000 steps) were all worse than 8 queries,
    lr 2e-3, batch 64.

    The bundled checkpoint adds a third stage (`--init-from` the stage-2 checkpoint, LM loss
    only, 35% captions, a new lr cycle peaking at 5e-4; see its model card). Stage 2's checkpoint
    was as weak on its own training scenes (color 79%, shape 80%) as on held-out ones, while its
    captions were right 99% of the time: the objects were encoded, the questions that pick an
    object by an attribute were underfit. Continued training (200 held-out scenes): 800 steps,
    25% captions, lr 3e-4: color 86.1%, shape 82.4%, caption 93.5%; 3000 steps, 35%, 5e-4: color
    and shape 100%, position 92.1%, caption 98.5%; 6000 steps (the bundled one, 637 s at 2
    threads): caption 99.0%, color 100%, shape 99.5%, count 100%, position 96.0%.
    """

    output: str = str(DEFAULT_OUTPUT)
    steps: int = 4500
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 150
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_fraction: float = 0.5
    train_scenes: int = 30000
    seed: int = 0
    threads: int = 1
    eval_scenes: int = 200
    # Q-Former hidden and attention dropout (0.1 is transformers' default; the vision tower and
    # the OPT decoder of the preset have none).
    qformer_dropout: float = 0.1
    # Each batch's VQA examples come from the scenes of its captions, so every image is encoded
    # once per step for two examples (half the vision / Q-Former cost per example).
    shared_images: bool = True
    # Weight of the training-only auxiliary loss (`slot_loss`) on the Q-Former outputs; 0: LM loss only.
    aux_weight: float = 1.0
    # First stage: this many steps of the auxiliary losses alone (vision tower, Q-Former and the
    # heads; no language model), before `steps` steps of LM + auxiliary loss. One lr schedule
    # spans both.
    stage1_steps: int = 2000
    slot_aux: bool = True
    shape_count_aux: bool = True
    slot_per_query: bool = False
    # initializer_range of the vision tower (the rest keeps the preset's init_std).
    vision_init_std: float = 0.1
    preset: TinyPreset = SCENES_PRESET
    # Continue from this checkpoint (written by this script) instead of a fresh initialisation:
    # the bundled model's stage 3 (see the model card).
    init_from: str | None = None


def build_model_and_processor(preset: TinyPreset, seed: int, qformer_dropout: float = 0.1,
                              vision_init_std: float | None = None):
    """A freshly initialised Blip2ForConditionalGeneration and its processor for `preset`.

    `vision_init_std` (default: the preset's init_std) is the vision tower's initializer_range.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration, GenerationConfig

    processor = build_processor(build_tokenizer(), preset.image_size, preset.num_query_tokens)
    tokenizer = processor.tokenizer
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = blip2_config(preset, vocab_size=len(tokenizer), image_token_index=image_token_index)
    # Cross-attention to the image in every Q-Former layer (the default, 2, skips every other one);
    # with only two layers the queries would otherwise see the image once.
    config.qformer_config.cross_attention_frequency = 1
    config.qformer_config.hidden_dropout_prob = qformer_dropout
    config.qformer_config.attention_probs_dropout_prob = qformer_dropout
    if vision_init_std is not None:
        config.vision_config.initializer_range = vision_init_std
    if config.image_token_index != image_token_index:
        raise RuntimeError(f"config image_token_index {config.image_token_index} != tokenizer {image_token_index}")
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    # transformers initialises the query tokens to zeros (right for loading pretrained weights);
    # from scratch, identical queries get identical cross-attention and only the decoder's
    # position embeddings tell them apart. BLIP-2 (LAVIS) draws them from N(0, initializer_range).
    with torch.no_grad():
        model.query_tokens.normal_(0.0, config.qformer_config.initializer_range)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_new_tokens=20, do_sample=False, num_beams=1
    )
    return model, processor


def encode_example(tokenizer, num_query_tokens: int, image_token_id: int, prompt: str, target: str):
    """Token ids and labels (equal lengths) for one (prompt, target) pair, BLIP-2 OPT style.

    `prompt` is "" for a caption. The target is appended with a leading space, as generation
    continues the prompt, and its tokens must extend the prompt's tokens unchanged.
    """
    prompt_ids = tokenizer(prompt).input_ids  # starts with BOS
    full_text = f"{prompt} {target}" if prompt else target
    full_ids = tokenizer(full_text).input_ids
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"tokenizing {full_text!r} changes the tokens of its prompt {prompt!r}")
    ids = [image_token_id] * num_query_tokens + full_ids + [EOS_ID]
    n_ignored = num_query_tokens + len(prompt_ids)
    labels = [IGNORE_INDEX] * n_ignored + ids[n_ignored:]
    return ids, labels


class SceneDataset:
    """Pre-rendered training scenes (uint8 pixels) and their encoded caption / VQA examples."""

    def __init__(self, n_scenes: int, seed: int, processor, num_query_tokens: int):
        import numpy as np
        import torch

        tokenizer = processor.tokenizer
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        scenes = generate_scenes(n_scenes, seed)
        self.pixels = torch.from_numpy(np.stack([np.asarray(s.image) for s in scenes])).permute(0, 3, 1, 2).contiguous()
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

        def enc(prompt, target):
            if (prompt, target) not in cache:
                cache[(prompt, target)] = encode_example(tokenizer, num_query_tokens, image_token_id, prompt, target)
            return cache[(prompt, target)]

        # (scene index, ids, labels)
        self.captions = [(i, *enc("", s.caption)) for i, s in enumerate(scenes)]
        self.vqa = [(i, *enc(qa.prompt, qa.answer)) for i, s in enumerate(scenes) for qa in s.qa]
        # Slot targets of the auxiliary loss (`slot_loss`): object k left to right -> (shape, color)
        # indices, (len(SHAPES), len(OBJECT_COLORS)) = "no object" for k >= number of objects.
        colors = list(OBJECT_COLORS)
        self.slots = torch.tensor([
            [(SHAPES.index(s.objects[k].shape), colors.index(s.objects[k].color)) if k < len(s.objects)
             else (len(SHAPES), len(colors)) for k in range(MAX_OBJECTS)]
            for s in scenes
        ])
        self.vqa_by_scene: list[list[int]] = [[] for _ in scenes]
        for k, (i, _, _) in enumerate(self.vqa):
            self.vqa_by_scene[i].append(k)
        self._check_pixels(processor, scenes[:4])

    def pixel_values(self, index):
        """Normalised float pixels [B, 3, H, W] for scene indices, as the image processor makes them."""
        return (self.pixels[index].float() / 255.0 - self.mean) / self.std

    def _check_pixels(self, processor, scenes):
        # The fast path above must equal what the processor does at inference time.
        import torch

        ref = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        diff = (ref - self.pixel_values(torch.arange(len(scenes)))).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"training pixel normalisation differs from the image processor by {diff}")

    def image_batch(self, batch_size: int, generator):
        """Random scenes for the auxiliary-only first stage: `pixel_values` and their `slots`."""
        import torch

        index = torch.randint(len(self.captions), (batch_size,), generator=generator)
        return {"pixel_values": self.pixel_values(index), "slots": self.slots[index]}

    def batch(self, batch_size: int, caption_fraction: float, generator, shared_images: bool = False):
        """A random batch: `pixel_values`, right-padded `input_ids`, `attention_mask`, `labels`,
        and `slots` [rows of pixel_values, MAX_OBJECTS, 2], the auxiliary loss's targets (`slot_loss`).

        With `shared_images`, the batch draws `round(batch_size * caption_fraction)` scenes and
        takes each one's caption plus VQA examples of the same scenes (scene `j % n` for the j-th
        VQA example), and `pixel_values` holds each scene once, with `image_index` mapping every
        example to its row: the vision tower and Q-Former then run once per scene (see `lm_loss`).
        """
        import torch

        n_cap = int(round(batch_size * caption_fraction))
        if shared_images:
            if n_cap < 1:
                raise ValueError("shared_images needs caption_fraction > 0")
            scenes = torch.randint(len(self.captions), (n_cap,), generator=generator).tolist()
            picks = torch.randint(1 << 30, (batch_size - n_cap,), generator=generator).tolist()
            examples = [self.captions[i] for i in scenes]
            for j, r in enumerate(picks):
                qa = self.vqa_by_scene[scenes[j % n_cap]]
                examples.append(self.vqa[qa[r % len(qa)]])
            image_index = [j if j < n_cap else (j - n_cap) % n_cap for j in range(len(examples))]
            scene_index = torch.tensor(scenes)
        else:
            cap = torch.randint(len(self.captions), (n_cap,), generator=generator).tolist()
            vqa = torch.randint(len(self.vqa), (batch_size - n_cap,), generator=generator).tolist()
            examples = [self.captions[i] for i in cap] + [self.vqa[i] for i in vqa]
            image_index = None
            scene_index = torch.tensor([i for i, _, _ in examples])
        width = max(len(ids) for _, ids, _ in examples)
        input_ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (_, ids, lab) in enumerate(examples):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            attention_mask[row, : len(ids)] = 1
        out = {
            "pixel_values": self.pixel_values(scene_index),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "slots": self.slots[scene_index],
        }
        if image_index is not None:
            out["image_index"] = torch.tensor(image_index)
        return out


def aux_heads(preset: TinyPreset, slot: bool, shape_count: bool, slot_per_query: bool = False):
    """The training-only auxiliary heads (a ModuleDict; None when every one is off)."""
    import torch

    heads = {}
    if slot and slot_per_query:
        heads["slot_query"] = torch.nn.Linear(preset.qformer_hidden, len(SHAPES) + 1 + len(OBJECT_COLORS) + 1)
    elif slot:
        heads["slot"] = slot_head(preset.num_query_tokens, preset.qformer_hidden)
    if shape_count:
        heads["shape_count"] = torch.nn.Linear(preset.vision_hidden, len(SHAPES) * (MAX_OBJECTS + 1))
    return torch.nn.ModuleDict(heads) if heads else None


def shape_count_loss(head, image_embeds, slots):
    """Cross-entropy of how many objects of each shape (0..MAX_OBJECTS) the image holds, read by a
    linear `head` from the mean of the vision tower's output tokens image_embeds [B, T, Dv]: a
    direct, translation-invariant shape signal into the vision tower."""
    import torch
    import torch.nn.functional as F

    counts = torch.stack([(slots[..., 0] == k).sum(-1) for k in range(len(SHAPES))], -1)  # [B, S]
    logits = head(image_embeds.mean(1)).view(-1, len(SHAPES), MAX_OBJECTS + 1)
    return F.cross_entropy(logits.reshape(-1, MAX_OBJECTS + 1), counts.reshape(-1))


def slot_head(num_query_tokens: int, qformer_hidden: int):
    """Training-only auxiliary head: the Q-Former's query outputs -> each object's shape and color.

    BLIP-2 trains its Q-Former in a first stage with losses on the query outputs themselves
    (image-text contrastive and matching) before the LM loss; here one linear layer reads the
    flattened query outputs [B, Q * H] and classifies, for each of the MAX_OBJECTS slots left to
    right, the shape (or "none") and the color (or "none"). It is not part of the checkpoint:
    only its gradient into the Q-Former and the vision tower is kept. See TrainConfig.aux_weight.
    """
    import torch

    n_out = MAX_OBJECTS * (len(SHAPES) + 1 + len(OBJECT_COLORS) + 1)
    return torch.nn.Linear(num_query_tokens * qformer_hidden, n_out)


def slot_loss(head, query_output, slots, per_query: bool = False):
    """Mean cross-entropy of `head` over the slots' shapes and colors; query_output [B, Q, H].

    per_query: `head` reads query k alone for slot k (the first MAX_OBJECTS queries then hold
    the objects left to right); otherwise it reads all queries flattened.
    """
    import torch.nn.functional as F

    n_shape, n_color = len(SHAPES) + 1, len(OBJECT_COLORS) + 1
    if per_query:
        logits = head(query_output[:, :MAX_OBJECTS])
    else:
        logits = head(query_output.flatten(1)).view(-1, MAX_OBJECTS, n_shape + n_color)
    return (F.cross_entropy(logits[..., :n_shape].reshape(-1, n_shape), slots[..., 0].reshape(-1))
            + F.cross_entropy(logits[..., n_shape:].reshape(-1, n_color), slots[..., 1].reshape(-1))) / 2


def losses_for(model, batch, heads=None):
    """(LM loss, auxiliary loss) for a batch; each image row is encoded once.

    The LM loss is None for an image-only batch (`SceneDataset.image_batch`); the auxiliary loss
    (the sum of the `heads`' losses, see `aux_heads`) is None without heads.

    The LM loss is BLIP-2's, `model(**batch).loss` when every example has its own image row: the
    query outputs of every row of `pixel_values` (`Blip2ForConditionalGeneration.
    get_image_features`) are gathered per example with `image_index` (when given) and scattered
    into the `<image>` positions exactly as the model's own forward does.
    """
    features = model.get_image_features(batch["pixel_values"], return_dict=True)
    aux = None
    if heads is not None:
        parts = []
        if "slot" in heads:
            parts.append(slot_loss(heads["slot"], features.qformer_outputs.last_hidden_state, batch["slots"]))
        if "slot_query" in heads:
            parts.append(slot_loss(heads["slot_query"], features.qformer_outputs.last_hidden_state, batch["slots"],
                                   per_query=True))
        if "shape_count" in heads:
            parts.append(shape_count_loss(heads["shape_count"], features.last_hidden_state, batch["slots"]))
        aux = sum(parts)
    if "input_ids" not in batch:  # an image-only batch (`SceneDataset.image_batch`)
        return None, aux
    image_features = features.pooler_output
    if "image_index" in batch:
        image_features = image_features[batch["image_index"]]
    input_ids = batch["input_ids"]
    inputs_embeds = model.get_input_embeddings()(input_ids)
    mask = model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds)
    inputs_embeds = inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))
    logits = model.language_model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    lm = model.loss_function(logits=logits[:, -labels.size(1):, :], labels=labels,
                             vocab_size=model.config.text_config.vocab_size)
    return lm, aux


def lm_loss(model, batch):
    """BLIP-2's LM loss for a batch (see `losses_for`)."""
    return losses_for(model, batch)[0]


def set_determinism(seed: int, threads: int) -> None:
    import random

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up then cosine decay to `min_lr_ratio` of the peak."""
    import math

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.stage1_steps + cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train(cfg: TrainConfig, progress: bool = True, model=None, processor=None, dataset=None):
    """Run the training loop; returns (model, processor, LM losses, auxiliary losses, seconds).

    The loss lists have one value per step; the auxiliary one is empty when `cfg.aux_weight` is 0.
    """
    import torch
    from tqdm.auto import tqdm

    set_determinism(cfg.seed, cfg.threads)
    if model is None:
        model, processor = build_model_and_processor(cfg.preset, cfg.seed, cfg.qformer_dropout, cfg.vision_init_std)
    if dataset is None:
        dataset = SceneDataset(cfg.train_scenes, TRAIN_SEED, processor, cfg.preset.num_query_tokens)
    # Drawn after the model's weights, so the model's initialisation does not depend on it.
    aux_head = aux_heads(cfg.preset, cfg.aux_weight > 0 and cfg.slot_aux, cfg.aux_weight > 0 and cfg.shape_count_aux,
                         cfg.slot_per_query)
    if cfg.stage1_steps and aux_head is None:
        raise ValueError("stage1_steps > 0 trains the auxiliary heads alone: it needs aux_weight > 0 and a head")
    model.train()
    named = list(model.named_parameters()) + (list(aux_head.named_parameters()) if aux_head is not None else [])
    decay = [p for n, p in named if p.ndim >= 2 and "query_tokens" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "query_tokens" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    aux_losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.stage1_steps + cfg.steps), desc="train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if step < cfg.stage1_steps:
            loss, aux = losses_for(model, dataset.image_batch(cfg.batch_size, generator), aux_head)
            total = aux
        else:
            batch = dataset.batch(cfg.batch_size, cfg.caption_fraction, generator, cfg.shared_images)
            loss, aux = losses_for(model, batch, aux_head)
            total = loss if aux is None else loss + cfg.aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if loss is not None:
            losses.append(loss.item())
        if aux is not None:
            aux_losses.append(aux.item())
        if step % 10 == 0:
            shown = {"loss": f"{sum(losses[-50:]) / len(losses[-50:]):.4f}"} if losses else {}
            if aux_losses:
                shown["aux"] = f"{sum(aux_losses[-50:]) / len(aux_losses[-50:]):.4f}"
            bar.set_postfix(**shown, lr=f"{scheduler.get_last_lr()[0]:.2e}")
    seconds = time.perf_counter() - start
    model.eval()
    return model, processor, losses, aux_losses, seconds


def plot_losses(losses: list[float], path: Path, title: str, aux_losses: list[float] | None = None,
                stage3_start: int | None = None, aux_only_steps: int | None = None) -> None:
    """Per-step and smoothed LM loss (after the auxiliary-only stage) and auxiliary loss (the steps
    that had one); `stage3_start` marks where a continued run (`--init-from`) began."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = 50

    def smooth(v):
        return [sum(v[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(v))]

    aux_losses = aux_losses or []
    # steps of the auxiliary-only stage; in a single run its auxiliary losses cover every step
    first = aux_only_steps if aux_only_steps is not None else len(aux_losses) - len(losses) if aux_losses else 0
    lm_x = list(range(first, first + len(losses)))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(lm_x, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="LM loss per step")
    ax.plot(lm_x, smooth(losses), color="tab:blue", linewidth=1.5, label=f"LM loss, mean of last {window}")
    if aux_losses:
        ax.plot(smooth(aux_losses), color="tab:orange", linewidth=1.5, label=f"auxiliary loss, mean of last {window}")
    if first:
        ax.axvline(first, color="gray", linestyle="--", linewidth=0.8, label="end of the auxiliary-only stage")
    if stage3_start is not None:
        ax.axvline(stage3_start, color="black", linestyle=":", linewidth=0.8, label="stage 3 (continued run) begins")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def count_parameters(model) -> dict[str, int]:
    parts = {"vision_model": model.vision_model, "qformer": model.qformer, "language_model": model.language_model}
    out = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    out["query_tokens + language_projection"] = model.query_tokens.numel() + sum(
        p.numel() for p in model.language_projection.parameters()
    )
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


def recipe_text(cfg: TrainConfig, seconds: float, machine: dict) -> str:
    """The bullets of the model card that say how a from-scratch run trained (stages 1 and 2)."""
    p = cfg.preset
    shared = (" about the same scenes: each image is encoded once per step for a caption and a question"
              if cfg.shared_images else "")
    aux_on = cfg.aux_weight > 0 and (cfg.slot_aux or cfg.shape_count_aux)
    aux_text = ""
    if aux_on:
        heads = []
        if cfg.slot_aux:
            heads.append("a linear head on the Q-Former's query outputs classifies each object's shape and color, "
                         "left to right" + (" (query k holds object k)" if cfg.slot_per_query else ""))
        if cfg.shape_count_aux:
            heads.append("a linear head on the mean of the vision tower's output tokens classifies how many circles, "
                         "squares and triangles there are")
        aux_text = (f"- auxiliary training-only loss (weight {cfg.aux_weight:g}; the heads are discarded, the checkpoint is the\n"
                    f"  standard class): " + "; ".join(heads) + ". It plays the part of BLIP-2's first stage, which trains\n"
                    f"  the Q-Former on losses of its own before the language model is attached\n")
        if cfg.stage1_steps:
            aux_text += (f"- stage 1: {cfg.stage1_steps} steps of the auxiliary loss alone (vision tower, Q-Former, heads; "
                         f"{cfg.batch_size} images a step)\n")
    return f"""- seed {cfg.seed} (weights init and batch sampling), `torch.use_deterministic_algorithms(True)`,
  {cfg.threads} intra-op threads; training scenes are seeds {TRAIN_SEED}..{TRAIN_SEED + cfg.train_scenes - 1}
{aux_text}- {"stage 2: " if aux_on and cfg.stage1_steps else ""}{cfg.steps} steps{" of LM + auxiliary loss" if aux_on else ""}, batch {cfg.batch_size} ({int(round(cfg.caption_fraction * 100))}% captions, the rest VQA{shared}),
  AdamW (betas 0.9/0.98, weight decay {cfg.weight_decay}), peak lr {cfg.lr} after {cfg.warmup_steps} warm-up steps,
  cosine decay to {cfg.min_lr_ratio:g}x, gradient clipping {cfg.grad_clip}; Q-Former dropout {cfg.qformer_dropout:g}
  (vision and OPT dropout 0)
- loss: BLIP-2's language-model loss, labels only on the target (caption or answer) and its
  `</s>`; -100 on the `<image>` query positions, the BOS, the prompt and padding{" (+ the auxiliary loss)" if aux_on else ""}
- initialisation: transformers' normal init, std {p.init_std} for the Q-Former and OPT, {cfg.vision_init_std} for the
  vision tower (`vision_config.initializer_range`); learned queries drawn from N(0, {p.init_std}), not zeros
- training time: {seconds / 60:.1f} min ({seconds:.0f} s) on {machine["cpu"]} ({machine["threads"]} threads,
  machine shared with other jobs), torch {machine["torch"]}, transformers {machine["transformers"]}
"""


def finetune_text(cfg: TrainConfig, seconds: float, machine: dict) -> str:
    """The model-card bullet of a run that continued from a checkpoint (`--init-from`)."""
    shared = ", each image encoded once per step" if cfg.shared_images else ""
    aux = "" if cfg.aux_weight == 0 else f" + auxiliary loss (weight {cfg.aux_weight:g}, fresh heads)"
    return f"""- stage 3, continued from those weights: {cfg.steps} steps of the LM loss{aux}, batch {cfg.batch_size}
  ({int(round(cfg.caption_fraction * 100))}% captions, the rest VQA{shared}), fresh AdamW state, a new lr cycle:
  peak {cfg.lr} after {cfg.warmup_steps} warm-up steps, cosine decay to {cfg.min_lr_ratio:g}x; seed {cfg.seed},
  {cfg.threads} intra-op threads; {seconds / 60:.1f} min ({seconds:.0f} s) on {machine["cpu"]}
"""


def _with_flag(command: str, flag: str, value: str) -> str:
    """`command` with the value after `flag` replaced (the two runs' shared directory gets one name)."""
    words = shlex.split(command)
    if flag in words[:-1]:
        words[words.index(flag) + 1] = value
    return shlex.join(words)


def write_model_card(output: Path, cfg: TrainConfig, command: str, seconds: float, params: dict[str, int],
                     report, machine: dict, final_loss: float, previous: dict | None = None) -> None:
    """README.md of the checkpoint; `previous` is the training log of the `--init-from` checkpoint."""
    p = cfg.preset
    size_mb = (output / "model.safetensors").stat().st_size / 1e6
    if previous is None:
        commands, recipe = command, recipe_text(cfg, seconds, machine)
    else:
        base = TrainConfig(**{**previous["config"], "preset": TinyPreset(**previous["config"]["preset"])})
        commands = f"{_with_flag(previous['command'], '--output', 'STAGE2_DIR')}\n{_with_flag(command, '--init-from', 'STAGE2_DIR')}"
        recipe = recipe_text(base, previous["seconds"], previous["machine"]) + finetune_text(cfg, seconds, machine)
    card = f"""# blip2-tiny-scenes

A tiny BLIP-2 OPT (`Blip2ForConditionalGeneration`, the standard transformers class) trained from
scratch on generated scenes of colored shapes (`blip2_triton.scenes`). It is the project's
embedded default model: small enough to ship in the package ({size_mb:.1f} MB of float32
weights) and trained to really caption and answer questions, so the export and serving paths
can be checked end to end on meaningful outputs, with no download.

It only knows its toy world: 1 to 3 circles, squares and triangles in red, green, blue, yellow,
purple or orange on a plain low-saturation background, {p.image_size}x{p.image_size} pixels.

## Usage

```python
from transformers import AutoProcessor, Blip2ForConditionalGeneration
from PIL import Image

model = Blip2ForConditionalGeneration.from_pretrained(path)
processor = AutoProcessor.from_pretrained(path)
image = Image.open("samples/scene_1000000.png")
inputs = processor(images=image, text="", return_tensors="pt")  # caption
inputs = processor(images=image, text="Question: what color is the circle? Answer:", return_tensors="pt")
# Blip2's generate() hands over to the OPT decoder, which does not see generation_config.json:
# pass it (greedy, eos </s>, max_new_tokens={model_generation_max(output)}).
out = model.generate(**inputs, generation_config=model.generation_config)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
```

Captions list the objects left to right: "a red circle", "a red circle and an orange square",
"a red circle, a blue square and a green triangle". Questions use BLIP-2's VQA format
`Question: {{q}} Answer:` and get one-word answers:

| kind | example question | answers |
|---|---|---|
| color | what color is the circle? | red, green, blue, yellow, purple, orange |
| shape | what shape is the red object? | circle, square, triangle |
| count | how many shapes are there? / how many circles are there? | zero .. three |
| position | is the red circle left or right of the blue square? | left, right |

## How it was made

```
{commands}
```

{recipe}- final loss (mean of the last 50 steps): {final_loss:.4f}; curve: `loss_curve.png`, raw numbers: `training_log.json`

## Architecture

| part | sizes | parameters |
|---|---|---:|
| vision (ViT) | image {p.image_size}, patch {p.patch_size}, hidden {p.vision_hidden}, {p.vision_layers} layers, {p.vision_heads} heads, MLP {4 * p.vision_hidden} | {params["vision_model"]:,} |
| Q-Former | {p.num_query_tokens} queries, hidden {p.qformer_hidden}, {p.qformer_layers} layers (cross-attention in each), {p.qformer_heads} heads, MLP {4 * p.qformer_hidden} | {params["qformer"]:,} |
| queries + projection | {p.num_query_tokens} x {p.qformer_hidden} query tokens, linear {p.qformer_hidden} -> {p.text_hidden} | {params["query_tokens + language_projection"]:,} |
| OPT decoder | hidden {p.text_hidden}, {p.text_layers} layers, {p.text_heads} heads, FFN {4 * p.text_hidden}, pre-layernorm, vocab {params["vocab"]} | {params["language_model"]:,} |
| total | | {params["total"]:,} |

Tokenizer: byte-level BPE trained offline on the scene vocabulary (`blip2_triton.tiny`), OPT
conventions: `</s>` = 2 is BOS and EOS, `<pad>` = 1, `<image>` = {params["image_token_index"]} (= `config.image_token_index`);
the processor puts {p.num_query_tokens} `<image>` placeholders before the BOS-prefixed prompt.

## Accuracy

Greedy `generate()` on {report.num_scenes} held-out scenes (seeds {HELDOUT_SEED}..{HELDOUT_SEED + report.num_scenes - 1},
never used in training), exact match after lower-casing and whitespace normalisation
(`python -m blip2_triton.evaluation --model <this directory> --scenes {report.num_scenes}`):

{report.table()}
"""
    below = [f"caption exact match ({report.accuracy('caption'):.1%})"] if report.accuracy("caption") < CAPTION_TARGET else []
    below += [f"VQA {k} ({report.accuracy(k):.1%})" for k in QA_KINDS if report.accuracy(k) < VQA_TARGET]
    if below:
        card += f"""
**Below target** ({CAPTION_TARGET:.0%} caption exact match, {VQA_TARGET:.0%} VQA per type) on: {", ".join(below)}.
It is committed as the best reproducible checkpoint so far, not as a finished default.
"""
    else:
        card += f"""
Meets the targets ({CAPTION_TARGET:.0%} caption exact match, {VQA_TARGET:.0%} VQA on every question type).
"""
    (output / "README.md").write_text(card)


def model_generation_max(output: Path) -> int:
    return json.loads((output / "generation_config.json").read_text()).get("max_new_tokens", 20)


def machine_facts(threads: int) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="blip2-triton train-tiny",
                                description="Train the tiny BLIP-2 OPT on generated scenes (CPU, minutes).")
    p.add_argument("--output", default=d.output, help="checkpoint directory to write (default: the bundled asset)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--caption-fraction", type=float, default=d.caption_fraction)
    p.add_argument("--train-scenes", type=int, default=d.train_scenes)
    p.add_argument("--seed", type=int, default=d.seed)
    # One thread: ops on this model are too small to gain from a second one, and on a busy
    # machine two synchronising threads ran ~10x slower per step than one.
    p.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads (fixed for reproducibility)")
    p.add_argument("--shared-images", action=argparse.BooleanOptionalAction, default=d.shared_images)
    p.add_argument("--qformer-dropout", type=float, default=d.qformer_dropout)
    p.add_argument("--stage1-steps", type=int, default=d.stage1_steps, help="auxiliary-only steps before the LM steps")
    p.add_argument("--slot-aux", action=argparse.BooleanOptionalAction, default=d.slot_aux)
    p.add_argument("--slot-per-query", action=argparse.BooleanOptionalAction, default=d.slot_per_query)
    p.add_argument("--shape-count-aux", action=argparse.BooleanOptionalAction, default=d.shape_count_aux)
    p.add_argument("--vision-init-std", type=float, default=d.vision_init_std)
    p.add_argument("--aux-weight", type=float, default=d.aux_weight, help="auxiliary slot loss weight; 0: LM loss only")
    p.add_argument("--patch-size", type=int, default=d.preset.patch_size)
    p.add_argument("--vision-hidden", type=int, default=d.preset.vision_hidden)
    p.add_argument("--vision-layers", type=int, default=d.preset.vision_layers)
    p.add_argument("--num-query-tokens", type=int, default=d.preset.num_query_tokens)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--eval-scenes", type=int, default=d.eval_scenes, help="held-out scenes to evaluate; 0 skips")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="continue from a checkpoint this script wrote (its architecture; fresh optimizer and lr cycle)")
    p.add_argument("--no-progress", action="store_true")
    return p


def load_for_finetuning(cfg: TrainConfig):
    """(model, processor, the checkpoint's own training log without its evaluation) for `--init-from`.

    Only checkpoints this script wrote: the log says how they were made (the model card needs it),
    and their architecture must be the one `cfg.preset` describes.
    """
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    source = Path(cfg.init_from)
    log_path = source / "training_log.json"
    if not log_path.is_file():
        raise SystemExit(f"--init-from {source}: no training_log.json; give a checkpoint this script wrote")
    previous = json.loads(log_path.read_text())
    if previous.get("previous") is not None:
        raise SystemExit(f"--init-from {source}: that checkpoint was itself continued; start from a from-scratch run")
    if previous["config"]["preset"] != asdict(cfg.preset):
        raise SystemExit(f"--init-from {source}: its architecture differs from the one the flags describe")
    previous.pop("evaluation", None)
    model = Blip2ForConditionalGeneration.from_pretrained(source)
    processor = AutoProcessor.from_pretrained(source)
    return model, processor, previous


def train_main(argv: list[str] | None = None) -> int:
    """CLI entry point: train, save the checkpoint, loss curve, log and model card, evaluate."""
    from blip2_triton.evaluation import GenerateAnswerer, evaluate

    args = build_parser().parse_args(argv)
    cfg = TrainConfig(
        output=args.output, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        caption_fraction=args.caption_fraction, train_scenes=args.train_scenes, seed=args.seed, threads=args.threads,
        eval_scenes=args.eval_scenes, qformer_dropout=args.qformer_dropout, shared_images=args.shared_images, min_lr_ratio=args.min_lr_ratio,
        aux_weight=args.aux_weight, vision_init_std=args.vision_init_std, slot_aux=args.slot_aux,
        shape_count_aux=args.shape_count_aux, stage1_steps=args.stage1_steps, slot_per_query=args.slot_per_query,
        init_from=args.init_from, preset=dataclasses.replace(
            SCENES_PRESET, patch_size=args.patch_size, vision_hidden=args.vision_hidden,
            vision_layers=args.vision_layers, num_query_tokens=args.num_query_tokens,
        ),
    )
    if not 0.0 <= cfg.caption_fraction <= 1.0:
        raise SystemExit("--caption-fraction must be between 0 and 1")
    argv_shown = sys.argv[1:] if argv is None else argv
    command = "python -m blip2_triton.training " + " ".join(argv_shown)
    output = Path(cfg.output)

    model = processor = previous = None
    if cfg.init_from:
        model, processor, previous = load_for_finetuning(cfg)
    model, processor, losses, aux_losses, seconds = train(cfg, progress=not args.no_progress, model=model,
                                                          processor=processor)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    print(f"trained {cfg.steps} steps in {seconds:.0f} s, final loss {final_loss:.4f}; wrote {output}")
    if previous is None:
        plot_losses(losses, output / "loss_curve.png",
                    f"blip2-tiny-scenes: {cfg.stage1_steps} + {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, seed {cfg.seed}",
                    aux_losses)
    else:
        base = previous["config"]
        plot_losses(previous["losses"] + losses, output / "loss_curve.png",
                    f"blip2-tiny-scenes: {base['stage1_steps']} + {base['steps']} + {cfg.steps} steps, seed {cfg.seed}",
                    previous["aux_losses"], stage3_start=base["stage1_steps"] + base["steps"],
                    aux_only_steps=base["stage1_steps"])

    report = None
    if cfg.eval_scenes > 0:
        report = evaluate(generate_scenes(cfg.eval_scenes, HELDOUT_SEED), GenerateAnswerer(model, processor),
                          batch_size=64)
        print(report.table())
    machine = machine_facts(cfg.threads)
    params = count_parameters(model) | {"vocab": model.config.text_config.vocab_size,
                                        "image_token_index": model.config.image_token_index}
    log = {"config": asdict(cfg), "command": command, "seconds": seconds,
           "machine": machine, "parameters": params, "losses": losses, "aux_losses": aux_losses,
           "evaluation": report.to_dict() if report else None, "previous": previous}
    (output / "training_log.json").write_text(json.dumps(log) + "\n")
    if report is not None:
        write_model_card(output, cfg, command, seconds, params, report, machine, final_loss, previous)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
