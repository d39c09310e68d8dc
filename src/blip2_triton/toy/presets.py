"""Tiny BLIP-2 OPT and Flan-T5 checkpoints built locally, with no download.

A checkpoint is a directory written by `save_pretrained` (model, tokenizer, image processor,
processor config, generation config), so everything downstream loads it through the real
`from_pretrained` path, exactly as it would load Salesforce/blip2-opt-2.7b or blip2-flan-t5-xl.

Presets cover the OPT variants the exporter must handle: pre-layernorm (OPT-125m/2.7b style),
word_embed_proj_dim != hidden_size with project_in/out, and post-layernorm (OPT-350m style); and
the T5 ones: Flan-T5 (gated-gelu, untied LM head), T5 v1.0 (relu, tied and rescaled LM head) and
more decoder than encoder layers. Retrieval presets (`RETRIEVAL_PRESETS`) build a
`Blip2ForImageTextRetrieval` (ITC projections and ITM head, no language model) with the Q-Former's
own BERT-style tokenizer, as Salesforce/blip2-itm-vit-g is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .tokenizer import IMAGE_TOKEN, build_bert_tokenizer, build_t5_tokenizer, build_tokenizer


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of one tiny BLIP-2; everything else comes from the transformers defaults."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    qformer_hidden: int = 32
    qformer_layers: int = 2
    qformer_heads: int = 4
    num_query_tokens: int = 4
    family: str = "opt"  # the language model's text_config.model_type: "opt" or "t5"
    text_hidden: int = 32  # T5: d_model
    text_layers: int = 2  # T5: encoder layers
    text_heads: int = 4
    ffn_dim: int | None = None  # None: 4 x text_hidden (T5: d_ff)
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    max_position_embeddings: int = 128
    # Wider than transformers' 0.02: random tiny models then give varied, image-dependent tokens,
    # so parity tests compare real sequences rather than one token repeated.
    init_std: float = 0.3
    # T5 only. None: text_hidden // text_heads, text_layers.
    d_kv: int | None = None
    num_decoder_layers: int | None = None
    feed_forward_proj: str = "gated-gelu"  # Flan-T5 (T5 v1.1); T5 v1.0 is "relu"
    # T5 v1.0 ties the LM head to the embedding and scales the decoder output by d_model**-0.5.
    tie_word_embeddings: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # T5's init scale (every std is a multiple of it; 1.0 is T5's). Wider in the tiny presets, for
    # init_std's reason.
    initializer_factor: float = 1.0
    # Rows of the LM's embedding / LM head. None: the tokenizer's size. Larger: rows past the
    # tokenizer are padding (as OPT pads 50265 tokens to 50272 rows), so a small offline tokenizer
    # can drive a decoder whose LM head costs what a real one costs. The <image> id is unchanged.
    vocab_size: int | None = None
    # "generation" (Blip2ForConditionalGeneration) or "retrieval" (Blip2ForImageTextRetrieval).
    task: str = "generation"
    # Retrieval only: width of the ITC space, the Q-Former's text positions (its longest text), how
    # often a Q-Former layer cross-attends (transformers' default: every 2nd), and whether the
    # processor inserts image tokens before the text (config.image_token_index set) or not.
    image_text_hidden_size: int = 256
    qformer_max_positions: int = 512
    cross_attention_frequency: int = 2
    image_token: bool = True
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

# BLIP-2 Flan-T5 / T5 presets, kept out of PRESETS (the OPT parity presets).
T5_PRESETS: dict[str, TinyPreset] = {
    # Flan-T5-like: gated-gelu, untied LM head, d_kv != d_model / heads.
    "tiny-t5": TinyPreset(family="t5", text_heads=4, d_kv=16, initializer_factor=2.0),
    # T5 v1.0-like: relu, tied and rescaled LM head, heads 12 wide (not a multiple of 8), other
    # relative-position buckets, image size and query count. Relu with a tied head falls into
    # one-token loops more often than gated-gelu; the wider init keeps most outputs varied.
    "tiny-t5-v1": TinyPreset(
        family="t5", image_size=48, patch_size=16, vision_heads=2, num_query_tokens=6, text_hidden=48,
        text_heads=4, d_kv=12, feed_forward_proj="relu", tie_word_embeddings=True,
        relative_attention_num_buckets=16, relative_attention_max_distance=20, initializer_factor=8.0,
    ),
    # More decoder than encoder layers.
    "tiny-t5-deep": TinyPreset(
        family="t5", image_size=24, patch_size=6, qformer_heads=2, num_query_tokens=3, text_hidden=40,
        text_heads=5, d_kv=8, num_decoder_layers=3, initializer_factor=3.0,
    ),
}

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
    # The same image stages with a Flan-T5-base-class LM (12 + 12 x 768, 12 heads of 64, d_ff 2048,
    # gated-gelu) and T5's 32128-row LM head.
    "base-t5": TinyPreset(
        image_size=224, patch_size=14, vision_hidden=768, vision_layers=12, vision_heads=12,
        qformer_hidden=768, qformer_layers=12, qformer_heads=12, num_query_tokens=32,
        family="t5", text_hidden=768, text_layers=12, text_heads=12, d_kv=64, ffn_dim=2048,
        init_std=0.02, vocab_size=32128,
    ),
    # The retrieval benchmark model: base-opt's image stages (ViT-B/14 at 224 px, the full-size
    # Q-Former with 32 queries) with BLIP-2's ITC width (256) and ITM head, random weights.
    "base-itm": TinyPreset(
        task="retrieval", image_size=224, patch_size=14, vision_hidden=768, vision_layers=12, vision_heads=12,
        qformer_hidden=768, qformer_layers=12, qformer_heads=12, num_query_tokens=32, init_std=0.02,
        image_text_hidden_size=256, qformer_max_positions=64, image_token=False,
    ),
}
# Blip2ForImageTextRetrieval presets (ITC + ITM): the retrieval parity tests run every entry.
RETRIEVAL_PRESETS: dict[str, TinyPreset] = {
    # The processor adds no image tokens (config.image_token_index None); a Q-Former layer
    # cross-attends every second layer, as in transformers' default.
    "tiny-itm": TinyPreset(
        task="retrieval", num_query_tokens=4, image_text_hidden_size=16, qformer_max_positions=24,
        image_token=False,
    ),
    # Other query count, widths and head counts; every layer cross-attends (as BLIP-2's released
    # Q-Former does); the processor prepends image tokens that transformers strips again.
    "tiny-itm-wide": TinyPreset(
        task="retrieval", image_size=48, patch_size=16, vision_hidden=48, vision_heads=6, qformer_hidden=48,
        qformer_layers=3, qformer_heads=3, num_query_tokens=6, image_text_hidden_size=24,
        qformer_max_positions=32, cross_attention_frequency=1,
    ),
}
ALL_PRESETS = {**PRESETS, **T5_PRESETS, **BENCH_PRESETS, **RETRIEVAL_PRESETS}
# Spread of a T5 preset's logits, as the OPT presets' (1.7 to 3): see build_tiny_checkpoint.
T5_LOGIT_STD = 2.0


def text_config(preset: TinyPreset, vocab_size: int) -> dict:
    p = preset
    if p.family == "t5":
        return dict(
            model_type="t5",
            vocab_size=vocab_size,
            d_model=p.text_hidden,
            d_kv=p.d_kv or p.text_hidden // p.text_heads,
            d_ff=p.ffn_dim or 4 * p.text_hidden,
            num_layers=p.text_layers,
            num_decoder_layers=p.num_decoder_layers,
            num_heads=p.text_heads,
            relative_attention_num_buckets=p.relative_attention_num_buckets,
            relative_attention_max_distance=p.relative_attention_max_distance,
            feed_forward_proj=p.feed_forward_proj,
            # transformers 5 always ties T5's weights at construction; this flag only sets
            # scale_decoder_outputs (the d_model**-0.5 rescale). Untied heads: build_tiny_checkpoint.
            tie_word_embeddings=p.tie_word_embeddings,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.0,
            initializer_factor=p.initializer_factor,
        )
    if p.family != "opt":
        raise ValueError(f"unknown language-model family {p.family!r}")
    return dict(
        model_type="opt",
        vocab_size=vocab_size,
        hidden_size=p.text_hidden,
        num_hidden_layers=p.text_layers,
        num_attention_heads=p.text_heads,
        ffn_dim=p.ffn_dim or 4 * p.text_hidden,
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


def blip2_config(preset: TinyPreset, vocab_size: int, image_token_index: int | None):
    from transformers import Blip2Config

    p = preset
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
        max_position_embeddings=p.qformer_max_positions,
        cross_attention_frequency=p.cross_attention_frequency,
        # The text half of each layer (its own feed-forward): what ITC's text encoder and ITM run.
        use_qformer_text_input=p.task == "retrieval",
    )
    return Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text_config(p, vocab_size),
        num_query_tokens=p.num_query_tokens,
        image_token_index=image_token_index,
        image_text_hidden_size=p.image_text_hidden_size,
        initializer_range=p.init_std,
        **p.extra,
    )


def build_processor(tokenizer, image_size: int, num_query_tokens: int | None):
    from transformers import Blip2Processor, BlipImageProcessor

    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    # Blip2Processor adds the <image> token to the tokenizer when it lacks one.
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)


def build_tiny_checkpoint(output: str | Path, preset: str = DEFAULT_PRESET, seed: int = 0) -> Path:
    """Write a random-weight tiny BLIP-2 checkpoint with its processor to `output`."""
    import torch
    from transformers import Blip2ForConditionalGeneration, GenerationConfig

    if preset not in ALL_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose from {sorted(ALL_PRESETS)}")
    p = ALL_PRESETS[preset]
    if p.task == "retrieval":
        return _build_retrieval_checkpoint(Path(output), p, seed)
    t5 = p.family == "t5"
    output = Path(output)
    processor = build_processor(build_t5_tokenizer() if t5 else build_tokenizer(), p.image_size, p.num_query_tokens)
    tokenizer = processor.tokenizer
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = blip2_config(p, vocab_size=max(len(tokenizer), p.vocab_size or 0), image_token_index=image_token_index)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    if t5:
        lm = model.language_model
        if not p.tie_word_embeddings:
            # Flan-T5's own head, initialized as T5 initializes an untied one. Saved beside the
            # embedding, from_pretrained keeps the two apart (it warns that they differ).
            lm.lm_head.weight = torch.nn.Parameter(torch.randn_like(lm.shared.weight) * p.initializer_factor)
        # T5 initializes the decoder's final norm weight to initializer_factor: the logits then lie
        # tens of nats apart and beam search and sampling all reduce to greedy. Their std is that
        # weight x initializer_factor x sqrt(d_model) (the tied head's d_model**-0.5 cancels the
        # root); a uniform rescale keeps every argmax and gives them std T5_LOGIT_STD.
        root = 1.0 if p.tie_word_embeddings else math.sqrt(p.text_hidden)
        with torch.no_grad():
            lm.decoder.final_layer_norm.weight.fill_(T5_LOGIT_STD / (p.initializer_factor * root))
        generation = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, max_new_tokens=20)
    else:
        generation = GenerationConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1, max_new_tokens=20)
    model.generation_config = generation
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output


def _build_retrieval_checkpoint(output: Path, p: TinyPreset, seed: int) -> Path:
    """A random-weight Blip2ForImageTextRetrieval with a BERT-style tokenizer (no language model)."""
    import torch
    from transformers import Blip2ForImageTextRetrieval

    processor = build_processor(build_bert_tokenizer(), p.image_size, p.num_query_tokens if p.image_token else None)
    tokenizer = processor.tokenizer
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if p.image_token else None
    # The text config is unused (no language model) but part of every Blip2Config: a tiny OPT.
    config = blip2_config(p, vocab_size=len(tokenizer), image_token_index=image_token_index)
    config.architectures = ["Blip2ForImageTextRetrieval"]
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config).eval()
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output
