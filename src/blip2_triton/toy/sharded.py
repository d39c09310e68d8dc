"""Random-weight BLIP-2 OPT checkpoints too big to hold in memory, written shard by shard.

The model is built on the meta device (no storage); each module that owns tensors is then given
storage, initialised by the `_init_weights` of the transformers model it belongs to (as the model's
own constructor would), written into the current safetensors shard and dropped. At any moment the
process holds one shard's tensors (`shard_bytes`) and one module. The directory is what
`save_pretrained` writes for a sharded model (`model-0000i-of-0000n.safetensors`, and
`model.safetensors.index.json`), plus the processor and configs, so it loads through
`from_pretrained` like any hub checkpoint.

Every module is seeded from (seed, its name): `materialized_modules` yields the same tensors again,
which is how the tests hold a loaded checkpoint to the modules it was written from.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Iterator

DEFAULT_SHARD_BYTES = 2 * 2**30
DTYPES = ("float32", "bfloat16")


def _owners(model) -> dict[str, object]:
    """Module name -> the innermost transformers PreTrainedModel containing it (whose _init_weights
    and config initialise it, as post_init does)."""
    from transformers import PreTrainedModel

    owners: dict[str, object] = {}
    stack: list[tuple[str, object]] = []
    for name, module in model.named_modules():
        while stack and not (name == stack[-1][0] or name.startswith(stack[-1][0] + ".") or stack[-1][0] == ""):
            stack.pop()
        if isinstance(module, PreTrainedModel):
            stack.append((name, module))
        owners[name] = stack[-1][1]
    return owners


def meta_model(config):
    """Blip2ForConditionalGeneration(config) with no storage (every tensor on the meta device)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    with torch.device("meta"):
        return Blip2ForConditionalGeneration(config)


def materialized_modules(config, seed: int = 0, dtype: str = "float32") -> Iterator[tuple[str, dict]]:
    """(module name, {full tensor name: tensor}) for every module that owns persistent tensors, in
    module order, each freshly materialised and initialised; tied tensors appear once (first name)."""
    import torch

    model = meta_model(config)
    owners = _owners(model)
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [(n, t) for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
               if n not in module._non_persistent_buffers_set]
        fresh = [(n, t) for n, t in own if id(t) not in seen]
        seen.update(id(t) for _, t in own)
        if not fresh:
            continue
        module.to_empty(device="cpu", recurse=False)
        torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        with torch.no_grad():
            owners[name]._init_weights(module)
        prefix = f"{name}." if name else ""
        tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        yield name, {prefix + n: tensors[n].detach().to(getattr(torch, dtype)).contiguous() for n, _ in fresh}
        _drop(module)


def _drop(module) -> None:
    """Give a module's tensors back (meta again), so memory holds one module at a time."""
    import torch

    for n, p in list(module.named_parameters(recurse=False)):
        setattr(module, n, torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad))
    for n, b in list(module.named_buffers(recurse=False)):
        module._buffers[n] = b.to("meta")


def build_sharded_checkpoint(output: str | Path, preset: str, seed: int = 0, dtype: str = "float32",
                             shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Path:
    """Write the random-weight BLIP-2 OPT `preset` to `output`, one shard at a time.

    dtype: the stored tensors' ("bfloat16" halves the disk; from_pretrained(dtype=float32) widens
    them exactly, and transformers in bf16 then runs the very same weights).
    """
    from safetensors.torch import save_file

    from blip2_triton.progress import Progress, peak_rss_mib

    from .presets import ALL_PRESETS, blip2_config, build_processor, opt_generation_config
    from .tokenizer import IMAGE_TOKEN, build_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    p = ALL_PRESETS[preset]
    if p.family != "opt" or p.task != "generation":
        raise ValueError(f"shard-by-shard building covers BLIP-2 OPT generation presets; {preset!r} is {p.family}/{p.task}")
    say = Progress("make-tiny", progress).say
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for old in output.glob("model*.safetensors*"):
        old.unlink()
    processor = build_processor(build_tokenizer(), p.image_size, p.num_query_tokens)
    tokenizer = processor.tokenizer
    config = blip2_config(p, vocab_size=max(len(tokenizer), p.vocab_size or 0),
                          image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    config.architectures = ["Blip2ForConditionalGeneration"]
    config.dtype = dtype

    shards: list[list[str]] = []
    pending: dict = {}
    pending_bytes = total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(output / f".shard-{len(shards)}"), metadata={"format": "pt"})
            shards.append(list(pending))
            say(f"shard {len(shards)}: {pending_bytes / 2**30:.2f} GiB, {total / 2**30:.2f} GiB so far, "
                f"peak RSS {peak_rss_mib():.0f} MiB")
            pending, pending_bytes = {}, 0

    for _, tensors in materialized_modules(config, seed, dtype):
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if pending and pending_bytes + size > shard_bytes:
            flush()
        pending.update(tensors)
        pending_bytes += size
        total += size
    flush()
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (output / f".shard-{i}").rename(output / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(output)
    opt_generation_config().save_pretrained(output)
    processor.save_pretrained(output)
    say(f"wrote {total / 2**30:.2f} GiB in {len(shards)} shards to {output}")
    return output
