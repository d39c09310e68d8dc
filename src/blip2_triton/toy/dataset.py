"""Training examples: pre-rendered scenes and their encoded caption / VQA examples, in batches.

The language-model loss is BLIP-2's: each sequence is

    <image> x num_query_tokens, </s> (BOS), prompt tokens, target tokens, </s> (EOS), <pad>...

and labels are -100 everywhere except on the target tokens and the EOS. Captioning examples have
an empty prompt (target = caption), VQA examples the prompt "Question: {q} Answer:" (target =
the one-word answer).
"""
from __future__ import annotations

from .model import EOS_ID, PAD_ID
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
