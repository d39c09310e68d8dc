"""The trained toy model: its sizes (`SCENES_PRESET`) and a fresh `Blip2ForConditionalGeneration`.

The model is the standard transformers class built from `Blip2Config` (every part trainable); the
tokenizer and processor are the offline ones of `toy.tokenizer` / `toy.presets`.
"""
from __future__ import annotations

from .presets import TinyPreset, blip2_config, build_processor
from .scenes import IMAGE_SIZE
from .tokenizer import IMAGE_TOKEN, build_tokenizer

BOS_ID, PAD_ID, EOS_ID = 2, 1, 2

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


def count_parameters(model) -> dict[str, int]:
    parts = {"vision_model": model.vision_model, "qformer": model.qformer, "language_model": model.language_model}
    out = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    out["query_tokens + language_projection"] = model.query_tokens.numel() + sum(
        p.numel() for p in model.language_projection.parameters()
    )
    out["total"] = sum(p.numel() for p in model.parameters())
    return out

