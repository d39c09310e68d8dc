"""Tiny BLIP-2 OPT checkpoints built locally, with no download.

A checkpoint is a directory written by `save_pretrained` (model, tokenizer, image processor,
processor config, generation config), so everything downstream loads it through the real
`from_pretrained` path, exactly as it would load Salesforce/blip2-opt-2.7b.

Presets cover the OPT variants the exporter must handle: pre-layernorm (OPT-125m/2.7b style),
word_embed_proj_dim != hidden_size with project_in/out, and post-layernorm (OPT-350m style).
"""
from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_TOKEN = "<image>"

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink")
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
POSITIONS = ("left", "right", "above", "below", "top", "bottom", "middle")


def scene_corpus() -> list[str]:
    """Sentences over the scene vocabulary, used to train the offline BPE tokenizer."""
    lines = ["a photo of", "a picture of", "this is", "an image of", "Question: Answer:", "yes", "no"]
    for color, shape in itertools.product(COLORS, SHAPES):
        lines.append(f"a {color} {shape}")
        lines.append(f"two {color} {shape}s")
        lines.append(f"Question: what color is the {shape}? Answer: {color}")
        lines.append(f"Question: is there a {color} {shape}? Answer: yes")
        lines.append(f"a {color} {shape} on a {color} background")
    for n, shape in itertools.product(NUMBERS, SHAPES):
        lines.append(f"Question: how many {shape}s are there? Answer: {n}")
    for pos, shape in itertools.product(POSITIONS, SHAPES):
        lines.append(f"Question: where is the {shape}? Answer: {pos}")
        lines.append(f"the {shape} is on the {pos} of the image, and a dog and a cat")
    # The trained default model's captions and questions (blip2_triton.scenes).
    from blip2_triton.scenes import scene_sentences

    lines.extend(scene_sentences())
    return lines


def build_tokenizer(vocab_size: int = 512):
    """Byte-level BPE tokenizer in OPT's conventions (bos = eos = </s> = 2, pad = 1).

    Trained offline on `scene_corpus()`; the processor later adds the `<image>` token.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        scene_corpus(), vocab_size=vocab_size, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        bpe.save(str(path))
        return GPT2TokenizerFast(
            tokenizer_file=str(path),
            bos_token="</s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            add_bos_token=True,
            padding_side="left",
        )


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of one tiny BLIP-2 OPT; everything else comes from the transformers defaults."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    qformer_hidden: int = 32
    qformer_layers: int = 2
    qformer_heads: int = 4
    num_query_tokens: int = 4
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    max_position_embeddings: int = 128
    # Wider than transformers' 0.02: random tiny models then give varied, image-dependent tokens,
    # so parity tests compare real sequences rather than one token repeated.
    init_std: float = 0.3
    # Rows of the LM's embedding / LM head. None: the tokenizer's size. Larger: rows past the
    # tokenizer are padding (as OPT pads 50265 tokens to 50272 rows), so a small offline tokenizer
    # can drive a decoder whose LM head costs what a real one costs. The <image> id is unchanged.
    vocab_size: int | None = None
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, TinyPreset] = {
    # The embedded default: pre-layernorm OPT, like OPT-2.7b/6.7b in Salesforce/blip2-opt-*.
    "tiny-opt": TinyPreset(),
    # word_embed_proj_dim != hidden_size: project_in / project_out, other head counts and image size.
    "tiny-opt-proj": TinyPreset(
        image_size=48, patch_size=16, vision_heads=2, num_query_tokens=6, text_hidden=48, text_heads=6,
        text_layers=3, word_embed_proj_dim=24,
    ),
    # Post-layernorm with project_in/out, like OPT-350m; heads 12 wide, which GroupQueryAttention
    # cannot take (multiples of 8): the decoder zero-pads them to 16 in the cache.
    "tiny-opt-postln": TinyPreset(
        image_size=24, patch_size=6, qformer_heads=2, num_query_tokens=3, text_hidden=60, text_heads=5,
        word_embed_proj_dim=20, do_layer_norm_before=False,
    ),
}
DEFAULT_PRESET = "tiny-opt"

# Benchmark presets, kept out of PRESETS: the parity tests run every entry of PRESETS, and
# exporting these takes minutes. build_tiny_checkpoint accepts both.
BENCH_PRESETS: dict[str, TinyPreset] = {
    # The benchmark model (blip2_triton.benchmarks): BLIP-2-class compute with random weights.
    # ViT-B/14 at 224 px (257 image tokens), the full-size Q-Former (12 layers, 32 queries) and an
    # OPT-125m-class decoder (12 x 768, ffn 3072) with OPT's 50272-row LM head.
    "base-opt": TinyPreset(
        image_size=224, patch_size=14, vision_hidden=768, vision_layers=12, vision_heads=12,
        qformer_hidden=768, qformer_layers=12, qformer_heads=12, num_query_tokens=32,
        text_hidden=768, text_layers=12, text_heads=12, max_position_embeddings=2048,
        init_std=0.02, vocab_size=50272,
    ),
}


def blip2_config(preset: TinyPreset, vocab_size: int, image_token_index: int):
    from transformers import Blip2Config

    p = preset
    text = dict(
        model_type="opt",
        vocab_size=vocab_size,
        hidden_size=p.text_hidden,
        num_hidden_layers=p.text_layers,
        num_attention_heads=p.text_heads,
        ffn_dim=4 * p.text_hidden,
        max_position_embeddings=p.max_position_embeddings,
        word_embed_proj_dim=p.word_embed_proj_dim or p.text_hidden,
        do_layer_norm_before=p.do_layer_norm_before,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        dropout=0.0,
        attention_dropout=0.0,
        init_std=p.init_std,
    )
    vision = dict(
        image_size=p.image_size,
        patch_size=p.patch_size,
        hidden_size=p.vision_hidden,
        intermediate_size=4 * p.vision_hidden,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        initializer_range=p.init_std,  # transformers' default here is 1e-10: images would not matter
    )
    qformer = dict(
        hidden_size=p.qformer_hidden,
        num_hidden_layers=p.qformer_layers,
        num_attention_heads=p.qformer_heads,
        intermediate_size=4 * p.qformer_hidden,
        encoder_hidden_size=p.vision_hidden,
        vocab_size=vocab_size,
        initializer_range=p.init_std,
    )
    return Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=p.num_query_tokens,
        image_token_index=image_token_index,
        initializer_range=p.init_std,
        **p.extra,
    )


def build_processor(tokenizer, image_size: int, num_query_tokens: int):
    from transformers import Blip2Processor, BlipImageProcessor

    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    # Blip2Processor adds the <image> token to the tokenizer when it lacks one.
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)


def build_tiny_checkpoint(output: str | Path, preset: str = DEFAULT_PRESET, seed: int = 0) -> Path:
    """Write a random-weight tiny BLIP-2 OPT checkpoint with its processor to `output`."""
    import torch
    from transformers import Blip2ForConditionalGeneration, GenerationConfig

    presets = {**PRESETS, **BENCH_PRESETS}
    if preset not in presets:
        raise ValueError(f"unknown tiny preset {preset!r}; choose from {sorted(presets)}")
    p = presets[preset]
    output = Path(output)
    processor = build_processor(build_tokenizer(), p.image_size, p.num_query_tokens)
    tokenizer = processor.tokenizer
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = blip2_config(p, vocab_size=max(len(tokenizer), p.vocab_size or 0), image_token_index=image_token_index)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1, max_new_tokens=20)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output
