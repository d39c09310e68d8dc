"""The trained toy models: their sizes (`SCENES_PRESETS`, one per family) and fresh models.

The model is the standard transformers class, `Blip2ForConditionalGeneration` built from
`Blip2Config` (every part trainable); the tokenizer and processor are the offline ones of
`toy.tokenizer` / `toy.presets`.
"""
from __future__ import annotations

import dataclasses
import math

from .presets import TinyPreset, blip2_config, build_processor
from .scenes import IMAGE_SIZE
from .tokenizer import IMAGE_TOKEN, build_t5_tokenizer, build_tokenizer

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
# Its Flan-T5 sibling: the same image stages (so they can start from the OPT model's, as BLIP-2's
# OPT and Flan-T5 models share one first stage) and a Flan-T5-style encoder-decoder (gated-gelu,
# untied LM head, T5's own init scale) with 2 + 2 layers: ~1.8M parameters, ~7 MB in float32.
SCENES_T5_PRESET = dataclasses.replace(
    SCENES_PRESET, family="t5", text_hidden=128, text_layers=2, num_decoder_layers=2, text_heads=4, d_kv=32,
    ffn_dim=256, feed_forward_proj="gated-gelu", initializer_factor=1.0,
)
SCENES_PRESETS = {"opt": SCENES_PRESET, "t5": SCENES_T5_PRESET}
# What the model cards and the demo call each family's language model.
FAMILY_NAMES = {"opt": "OPT", "t5": "Flan-T5"}


def build_model_and_processor(preset: TinyPreset, seed: int, qformer_dropout: float = 0.1,
                              vision_init_std: float | None = None):
    """A freshly initialised Blip2ForConditionalGeneration and its processor for `preset`.

    `vision_init_std` (default: the preset's init_std) is the vision tower's initializer_range.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration

    t5 = preset.family == "t5"
    processor = build_processor(build_t5_tokenizer() if t5 else build_tokenizer(), preset.image_size,
                                preset.num_query_tokens)
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
    if t5:
        untie_lm_head(model)
    model.generation_config = generation_config(tokenizer, encoder_decoder=t5)
    return model, processor


def untie_lm_head(model) -> None:
    """Give the T5 LM its own head, as Flan-T5 has (transformers 5 ties it to the embedding at
    construction). Drawn with std d_model**-0.5 rather than T5's 1.0: with an untied head T5 does
    not rescale the decoder output, so the initial logits then have unit spread instead of sqrt(d_model)."""
    import torch

    lm = model.language_model
    d_model = lm.config.d_model
    lm.lm_head.weight = torch.nn.Parameter(torch.randn_like(lm.shared.weight) / math.sqrt(d_model))


def generation_config(tokenizer, encoder_decoder: bool):
    """Greedy, 20 new tokens, the tokenizer's special ids: OPT's </s> is BOS and EOS; T5's decoder
    starts from <pad>."""
    from transformers import GenerationConfig

    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if encoder_decoder:
        ids["decoder_start_token_id"] = tokenizer.pad_token_id
    else:
        ids["bos_token_id"] = tokenizer.bos_token_id
    return GenerationConfig(**ids, max_new_tokens=20, do_sample=False, num_beams=1)


def copy_image_stages(model, source) -> None:
    """Load the vision tower, the Q-Former and the learned queries of checkpoint `source` into
    `model` (BLIP-2's first stage, shared by its OPT and Flan-T5 models); the language projection
    and the language model stay as they are. The two must have the same image-stage sizes."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    donor = Blip2ForConditionalGeneration.from_pretrained(source)
    try:
        model.vision_model.load_state_dict(donor.vision_model.state_dict())
        model.qformer.load_state_dict(donor.qformer.state_dict())
    except RuntimeError as e:
        raise ValueError(f"{source}: its image stages differ in size from this model's: {e}") from None
    with torch.no_grad():
        model.query_tokens.copy_(donor.query_tokens)


def count_parameters(model) -> dict[str, int]:
    parts = {"vision_model": model.vision_model, "qformer": model.qformer, "language_model": model.language_model}
    out = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    out["query_tokens + language_projection"] = model.query_tokens.numel() + sum(
        p.numel() for p in model.language_projection.parameters()
    )
    out["total"] = sum(p.numel() for p in model.parameters())
    return out

