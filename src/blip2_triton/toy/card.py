"""What a training run leaves beside its checkpoint: the loss curve plot and the model card."""
from __future__ import annotations

import json
import platform
import shlex
from pathlib import Path

from .config import TrainConfig
from .evaluation import CAPTION_TARGET, VQA_TARGET
from .model import FAMILY_NAMES
from .presets import TinyPreset
from .scenes import HELDOUT_SEED, QA_KINDS, TRAIN_SEED


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
  (vision and {FAMILY_NAMES[p.family]} dropout 0)
{_loss_text(p.family, aux_on)}{_init_text(cfg)}- training time: {seconds / 60:.1f} min ({seconds:.0f} s) on {machine["cpu"]} ({machine["threads"]} threads,
  machine shared with other jobs), torch {machine["torch"]}, transformers {machine["transformers"]}
"""


def _loss_text(family: str, aux_on: bool) -> str:
    aux = " (+ the auxiliary loss)" if aux_on else ""
    if family == "t5":
        return f"""- loss: BLIP-2's language-model loss for Flan-T5: the encoder reads the query embeddings and the
  prompt (with its `</s>`; a caption's prompt is empty), the decoder's labels are the target (caption
  or answer) and its `</s>`, -100 on padding{aux}
"""
    return f"""- loss: BLIP-2's language-model loss, labels only on the target (caption or answer) and its
  `</s>`; -100 on the `<image>` query positions, the BOS, the prompt and padding{aux}
"""


def _init_text(cfg: TrainConfig) -> str:
    p = cfg.preset
    if cfg.image_stages_from:
        return f"""- initialisation: the vision tower, Q-Former and learned queries are those of
  `{Path(cfg.image_stages_from).name}` (BLIP-2's OPT and Flan-T5 models share their first stage too); the
  language projection is fresh (std {p.init_std}), the {FAMILY_NAMES[p.family]} model has transformers' T5 init (factor
  {p.initializer_factor:g}) with an untied LM head drawn with std d_model**-0.5
"""
    return f"""- initialisation: transformers' normal init, std {p.init_std} for the Q-Former and {FAMILY_NAMES[p.family]}, {cfg.vision_init_std} for the
  vision tower (`vision_config.initializer_range`); learned queries drawn from N(0, {p.init_std}), not zeros
"""


def finetune_text(cfg: TrainConfig, seconds: float, machine: dict) -> str:
    """The model-card bullet of a run that continued from a checkpoint (`--init-from`)."""
    shared = ", each image encoded once per step" if cfg.shared_images else ""
    aux = "" if cfg.aux_weight == 0 else f" + auxiliary loss (weight {cfg.aux_weight:g}, fresh heads)"
    if cfg.aux_weight > 0 and cfg.order_aux:
        aux += (" (the order loss: a linear head on the T5 encoder's output at each object a position question names"
                " classifies the object's rank left to right)")
    if cfg.aux_weight > 0 and cfg.answer_aux:
        aux += (" (the answer loss: a linear head on the T5 encoder's output at a position question's last"
                " prompt token classifies its answer)")
    if cfg.aux_weight > 0 and cfg.pointer_aux:
        aux += (" (the pointer loss: two heads of the T5 decoder's first cross-attention layer are pointed, at the"
                " first decoding step, at the shape words of the two objects a position question names)")
    if cfg.position_bias_lr_scale != 1.0:
        aux += f", the relative-position bias tables' learning rate {cfg.position_bias_lr_scale:g}x the peak lr"
    if cfg.position_lm_weight != 1.0:
        aux += f", the position questions' LM loss weighted {cfg.position_lm_weight:g}x"
    if cfg.qa_weights:
        shared += "; questions drawn by kind weight " + ", ".join(f"{k} x{w:g}" for k, w in cfg.qa_weights.items())
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
                     report, machine: dict, final_loss: float, previous: dict | None = None,
                     base: TrainConfig | None = None) -> None:
    """README.md of the checkpoint; `previous` is the training log of the `--init-from` checkpoint
    and `base` that run's TrainConfig."""
    if previous is None:
        commands, recipe = command, recipe_text(cfg, seconds, machine)
    else:
        commands = f"{_with_flag(previous['command'], '--output', 'STAGE2_DIR')}\n{_with_flag(command, '--init-from', 'STAGE2_DIR')}"
        recipe = recipe_text(base, previous["seconds"], previous["machine"]) + finetune_text(cfg, seconds, machine)
    card = "".join([
        _intro(output, cfg if base is None else base), _usage(output, cfg.preset.family), EXAMPLES,
        f"## How it was made\n\n```\n{commands}\n```\n\n{recipe}- final loss (mean of the last 50 steps): "
        f"{final_loss:.4f}; curve: `loss_curve.png`, raw numbers: `training_log.json`\n\n",
        _architecture(cfg.preset, params), _tokenizer(cfg.preset, params), _accuracy(report),
    ])
    (output / "README.md").write_text(card)


def _intro(output: Path, cfg: TrainConfig) -> str:
    size_mb = (output / "model.safetensors").stat().st_size / 1e6
    if cfg.preset.family == "opt":
        head = f"""A tiny BLIP-2 OPT (`Blip2ForConditionalGeneration`, the standard transformers class) trained from
scratch on generated scenes of colored shapes (`blip2_triton.toy.scenes`). It is the project's
embedded default model: small enough to ship in the package ({size_mb:.1f} MB of float32"""
    else:
        started = (f", its image stages\nstarted from those of `{Path(cfg.image_stages_from).name}`" if cfg.image_stages_from
                   else " from\nscratch")
        head = f"""A tiny BLIP-2 {FAMILY_NAMES[cfg.preset.family]} (`Blip2ForConditionalGeneration`, the standard transformers class) trained
on generated scenes of colored shapes (`blip2_triton.toy.scenes`){started}. It is the
{FAMILY_NAMES[cfg.preset.family]} sibling of the project's embedded default model (`blip2-tiny-scenes`, OPT): small
enough to ship in the package ({size_mb:.1f} MB of float32"""
    p = cfg.preset
    return f"""# {output.name}

{head}
weights) and trained to really caption and answer questions, so the export and serving paths
can be checked end to end on meaningful outputs, with no download.

It only knows its toy world: 1 to 3 circles, squares and triangles in red, green, blue, yellow,
purple or orange on a plain low-saturation background, {p.image_size}x{p.image_size} pixels.

"""


def _usage(output: Path, family: str) -> str:
    if family == "t5":
        handover = f"""# Blip2's generate() hands over to the T5 model, which does not see generation_config.json:
# pass it (greedy, eos </s>, max_new_tokens={model_generation_max(output)}). A caption needs text="" (image tokens +
# </s>): without input_ids transformers appends text_config.bos_token_id, which T5 lacks.
out = model.generate(**inputs, generation_config=model.generation_config)
print(processor.batch_decode(out[:, 1:], skip_special_tokens=True)[0].strip())  # after the decoder start token"""
    else:
        handover = f"""# Blip2's generate() hands over to the OPT decoder, which does not see generation_config.json:
# pass it (greedy, eos </s>, max_new_tokens={model_generation_max(output)}).
out = model.generate(**inputs, generation_config=model.generation_config)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())"""
    return f"""## Usage

```python
from transformers import AutoProcessor, Blip2ForConditionalGeneration
from PIL import Image

model = Blip2ForConditionalGeneration.from_pretrained(path)
processor = AutoProcessor.from_pretrained(path)
image = Image.open("samples/scene_1000000.png")
inputs = processor(images=image, text="", return_tensors="pt")  # caption
inputs = processor(images=image, text="Question: what color is the circle? Answer:", return_tensors="pt")
{handover}
```

"""


EXAMPLES = """Captions list the objects left to right: "a red circle", "a red circle and an orange square",
"a red circle, a blue square and a green triangle". Questions use BLIP-2's VQA format
`Question: {q} Answer:` and get one-word answers:

| kind | example question | answers |
|---|---|---|
| color | what color is the circle? | red, green, blue, yellow, purple, orange |
| shape | what shape is the red object? | circle, square, triangle |
| count | how many shapes are there? / how many circles are there? | zero .. three |
| position | is the red circle left or right of the blue square? | left, right |

"""


def _architecture(p: TinyPreset, params: dict[str, int]) -> str:
    if p.family == "t5":
        lm = (f"| Flan-T5 encoder-decoder | d_model {p.text_hidden}, {p.text_layers} encoder + {p.num_decoder_layers or p.text_layers} "
              f"decoder layers, {p.text_heads} heads of {p.d_kv}, gated-gelu FFN {p.ffn_dim}, untied LM head, vocab "
              f"{params['vocab']} | {params['language_model']:,} |")
    else:
        lm = (f"| OPT decoder | hidden {p.text_hidden}, {p.text_layers} layers, {p.text_heads} heads, FFN {4 * p.text_hidden}, "
              f"pre-layernorm, vocab {params['vocab']} | {params['language_model']:,} |")
    return f"""## Architecture

| part | sizes | parameters |
|---|---|---:|
| vision (ViT) | image {p.image_size}, patch {p.patch_size}, hidden {p.vision_hidden}, {p.vision_layers} layers, {p.vision_heads} heads, MLP {4 * p.vision_hidden} | {params["vision_model"]:,} |
| Q-Former | {p.num_query_tokens} queries, hidden {p.qformer_hidden}, {p.qformer_layers} layers (cross-attention in each), {p.qformer_heads} heads, MLP {4 * p.qformer_hidden} | {params["qformer"]:,} |
| queries + projection | {p.num_query_tokens} x {p.qformer_hidden} query tokens, linear {p.qformer_hidden} -> {p.text_hidden} | {params["query_tokens + language_projection"]:,} |
{lm}
| total | | {params["total"]:,} |

"""


def _tokenizer(p: TinyPreset, params: dict[str, int]) -> str:
    if p.family == "t5":
        return f"""Tokenizer: SentencePiece-style Unigram over the scene vocabulary, built offline
(`blip2_triton.toy.tokenizer`), T5 conventions: `<pad>` = 0 (also the decoder start token), `</s>` = 1
ends every text, `<unk>` = 2, `<image>` = {params["image_token_index"]} (= `config.image_token_index`); the processor puts
{p.num_query_tokens} `<image>` placeholders before the prompt and its `</s>`, which the encoder reads.

"""
    return f"""Tokenizer: byte-level BPE trained offline on the scene vocabulary (`blip2_triton.toy.tokenizer`), OPT
conventions: `</s>` = 2 is BOS and EOS, `<pad>` = 1, `<image>` = {params["image_token_index"]} (= `config.image_token_index`);
the processor puts {p.num_query_tokens} `<image>` placeholders before the BOS-prefixed prompt.

"""


def _accuracy(report) -> str:
    text = f"""## Accuracy

Greedy `generate()` on {report.num_scenes} held-out scenes (seeds {HELDOUT_SEED}..{HELDOUT_SEED + report.num_scenes - 1},
never used in training), exact match after lower-casing and whitespace normalisation
(`python -m blip2_triton.toy.evaluation --model <this directory> --scenes {report.num_scenes}`):

{report.table()}
"""
    below = [f"caption exact match ({report.accuracy('caption'):.1%})"] if report.accuracy("caption") < CAPTION_TARGET else []
    below += [f"VQA {k} ({report.accuracy(k):.1%})" for k in QA_KINDS if report.accuracy(k) < VQA_TARGET]
    if below:
        return text + f"""
**Below target** ({CAPTION_TARGET:.0%} caption exact match, {VQA_TARGET:.0%} VQA per type) on: {", ".join(below)}.
It is committed as the best reproducible checkpoint so far, not as a finished default.
"""
    return text + f"""
Meets the targets ({CAPTION_TARGET:.0%} caption exact match, {VQA_TARGET:.0%} VQA on every question type).
"""


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
