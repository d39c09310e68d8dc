"""Training examples: pre-rendered scenes and their encoded caption / VQA examples, in batches.

The language-model loss is BLIP-2's. With OPT (decoder-only) each sequence is

    <image> x num_query_tokens, </s> (BOS), prompt tokens, target tokens, </s> (EOS), <pad>...

and labels are -100 everywhere except on the target tokens and the EOS. With Flan-T5
(encoder-decoder) the encoder reads `<image> x num_query_tokens, prompt tokens, </s>` and the
labels are the decoder's: the target tokens and `</s>`. Captioning examples have an empty prompt
(target = caption), VQA examples the prompt "Question: {q} Answer:" (target = the one-word answer).
"""
from __future__ import annotations

import random

from .scenes import MAX_OBJECTS, OBJECT_COLORS, SHAPES, generate_scenes
from .tokenizer import IMAGE_TOKEN

IGNORE_INDEX = -100


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
    ids = [image_token_id] * num_query_tokens + full_ids + [tokenizer.eos_token_id]
    n_ignored = num_query_tokens + len(prompt_ids)
    labels = [IGNORE_INDEX] * n_ignored + ids[n_ignored:]
    return ids, labels


def encode_encoder_decoder_example(tokenizer, num_query_tokens: int, image_token_id: int, prompt: str, target: str):
    """Encoder ids and decoder labels for one (prompt, target) pair, BLIP-2 Flan-T5 style.

    The encoder ids are what `processor(images=image, text=prompt)` gives (T5's tokenizer ends
    every text with </s>, so a caption's prompt "" is the image tokens and </s>); the labels are the
    target's tokens and </s>, which T5 shifts right behind its decoder start token to make the
    decoder's inputs. Each is as long as it is: `SceneDataset.batch` pads them apart.
    """
    ids = [image_token_id] * num_query_tokens + tokenizer(prompt).input_ids
    labels = tokenizer(target).input_ids
    if labels[-1] != tokenizer.eos_token_id:
        raise ValueError(f"the tokenizer does not end {target!r} with its EOS token")
    return ids, labels


def order_targets(tokenizer, ids: list[int], objects) -> list[tuple[int, int]]:
    """(position in `ids`, rank left to right) of the shape word of every object `ids` names by
    "color shape": where the order loss reads each named object's rank."""
    names = {tuple(tokenizer(o.name, add_special_tokens=False).input_ids): rank for rank, o in enumerate(objects)}
    found = []
    for name, rank in names.items():
        for j in range(len(ids) - len(name) + 1):
            if tuple(ids[j: j + len(name)]) == name:
                found.append((j + len(name) - 1, rank))
    return sorted(found)


def prefix_split(scene) -> tuple[str, str]:
    """(prefix, suffix) of the scene's caption, split after a word drawn from the scene's seed:
    "a red circle and" / "a blue square". The encoder reads the prefix, the decoder learns the suffix."""
    words = scene.caption.split()
    k = random.Random(scene.seed).randint(1, len(words) - 1)
    return " ".join(words[:k]), " ".join(words[k:])


class SceneDataset:
    """Pre-rendered training scenes (uint8 pixels) and their encoded caption / VQA examples."""

    def __init__(self, n_scenes: int, seed: int, processor, num_query_tokens: int, encoder_decoder: bool = False):
        import numpy as np
        import torch

        tokenizer = processor.tokenizer
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        encode = encode_encoder_decoder_example if encoder_decoder else encode_example
        self.pad_id = tokenizer.pad_token_id
        scenes = generate_scenes(n_scenes, seed)
        self.pixels = torch.from_numpy(np.stack([np.asarray(s.image) for s in scenes])).permute(0, 3, 1, 2).contiguous()
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

        def enc(prompt, target):
            if (prompt, target) not in cache:
                cache[(prompt, target)] = encode(tokenizer, num_query_tokens, image_token_id, prompt, target)
            return cache[(prompt, target)]

        # (scene index, ids, labels)
        self.captions = [(i, *enc("", s.caption)) for i, s in enumerate(scenes)]
        self.vqa = [(i, *enc(qa.prompt, qa.answer)) for i, s in enumerate(scenes) for qa in s.qa]
        self.vqa_kinds = [qa.kind for s in scenes for qa in s.qa]
        # Targets of the order loss (`losses.order_loss`), per VQA example: (token position, rank
        # left to right) of each object a position question names; empty for other kinds.
        self.vqa_order = [order_targets(tokenizer, ids, s.objects) if qa.kind == "position" else []
                          for s, (_, ids, _), qa in zip((s for s in scenes for _ in s.qa), self.vqa,
                                                        (qa for s in scenes for qa in s.qa))]
        # Targets of the answer loss (`losses.answer_loss`), per VQA example: 0 left / 1 right for a
        # position question, -1 for other kinds.
        self.vqa_answer = [("left", "right").index(qa.answer) if qa.kind == "position" else -1
                           for s in scenes for qa in s.qa]
        # Encoder-decoder only: each caption also split into an encoder prefix and a decoder suffix
        # (`prefix_split`), BLIP-2's prefix language modelling for Flan-T5. Decoder-only LMs
        # continue a prompted caption by their very loss.
        self.prefixed = [(i, *enc(*prefix_split(s))) for i, s in enumerate(scenes)] if encoder_decoder else None
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

    def _weighted_pick(self, candidates: list[int], qa_weights: dict[str, float], u: float) -> int:
        """The VQA example of `candidates` that `u` in [0, 1) falls on, each weighted by its kind."""
        weights = [qa_weights.get(self.vqa_kinds[k], 1.0) for k in candidates]
        target, acc = u * sum(weights), 0.0
        for k, w in zip(candidates, weights):
            acc += w
            if target < acc:
                return k
        return candidates[-1]

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

    def batch(self, batch_size: int, caption_fraction: float, generator, shared_images: bool = False,
              prefix_fraction: float = 0.0, qa_weights: dict[str, float] | None = None):
        """A random batch: `pixel_values`, right-padded `input_ids`, `attention_mask`, `labels`,
        `slots` [rows of pixel_values, MAX_OBJECTS, 2], the auxiliary loss's targets (`slot_loss`),
        `order` [N, 3]: (example, token position, rank) targets of `order_loss`, and `answer` [N, 2]:
        (example, 0 left / 1 right) targets of `answer_loss`.

        `prefix_fraction` of the captions (on average) are their prefix-LM examples (encoder-decoder only).

        `qa_weights` (kind -> weight, 1 for a kind not named; `shared_images` only) draws each
        scene's question with probability proportional to its kind's weight instead of uniformly.

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
            if qa_weights:
                us = torch.rand(batch_size - n_cap, generator=generator).tolist()
                vqa = [self._weighted_pick(self.vqa_by_scene[scenes[j % n_cap]], qa_weights, u) for j, u in enumerate(us)]
            else:
                picks = torch.randint(1 << 30, (batch_size - n_cap,), generator=generator).tolist()
                vqa = [self.vqa_by_scene[scenes[j % n_cap]][r % len(self.vqa_by_scene[scenes[j % n_cap]])]
                       for j, r in enumerate(picks)]
            examples = [self.captions[i] for i in scenes] + [self.vqa[k] for k in vqa]
            image_index = [j if j < n_cap else (j - n_cap) % n_cap for j in range(len(examples))]
            scene_index = torch.tensor(scenes)
        else:
            if qa_weights:
                raise ValueError("qa_weights needs shared_images")
            cap = torch.randint(len(self.captions), (n_cap,), generator=generator).tolist()
            vqa = torch.randint(len(self.vqa), (batch_size - n_cap,), generator=generator).tolist()
            examples = [self.captions[i] for i in cap] + [self.vqa[i] for i in vqa]
            image_index = None
            scene_index = torch.tensor([i for i, _, _ in examples])
        if prefix_fraction > 0:
            if self.prefixed is None:
                raise ValueError("prefix_fraction needs an encoder-decoder dataset")
            swap = (torch.rand(n_cap, generator=generator) < prefix_fraction).tolist()
            examples[:n_cap] = [self.prefixed[ex[0]] if take else ex for ex, take in zip(examples[:n_cap], swap)]
        # Right padding; ids and labels are padded apart (with OPT they have equal lengths).
        width = max(len(ids) for _, ids, _ in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), max(len(lab) for _, _, lab in examples)), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (_, ids, lab) in enumerate(examples):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            attention_mask[row, : len(ids)] = 1
        order = [(n_cap + j, pos, rank) for j, k in enumerate(vqa) for pos, rank in self.vqa_order[k]]
        answer = [(n_cap + j, self.vqa_answer[k]) for j, k in enumerate(vqa) if self.vqa_answer[k] >= 0]
        out = {
            "pixel_values": self.pixel_values(scene_index),
            "order": torch.tensor(order, dtype=torch.long).view(-1, 3),
            "answer": torch.tensor(answer, dtype=torch.long).view(-1, 2),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "slots": self.slots[scene_index],
        }
        if image_index is not None:
            out["image_index"] = torch.tensor(image_index)
        return out
