"""Train the embedded default model: a tiny BLIP-2 OPT that captions and answers generated scenes.

The model (`toy.model`) is trained on scenes (`toy.scenes`) from seeds `[TRAIN_SEED, TRAIN_SEED +
n)` with BLIP-2's language-model loss (`toy.dataset`, `toy.losses`); the evaluation that ends a
run uses the disjoint held-out range starting at `HELDOUT_SEED` (`toy.evaluation`), and the run
leaves its loss curve, log and model card beside the checkpoint (`toy.card`).

    python -m blip2_triton.toy.train --output src/blip2_triton/assets/blip2-tiny-scenes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .card import machine_facts, plot_losses, write_model_card
from .config import TrainConfig
from .dataset import SceneDataset
from .losses import aux_heads, losses_for
from .embedded import TRAINED_MODELS
from .model import SCENES_PRESETS, build_model_and_processor, copy_image_stages, count_parameters
from .presets import TinyPreset
from .scenes import HELDOUT_SEED, QA_KINDS, TRAIN_SEED, generate_scenes


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


def train(cfg: TrainConfig, progress: bool = True, model=None, processor=None, dataset=None, on_step=None):
    """Run the training loop; returns (model, processor, LM losses, auxiliary losses, seconds).

    The loss lists have one value per step; the auxiliary one is empty when `cfg.aux_weight` is 0.
    `on_step(step, model, losses, aux_losses)`, when given, runs after each step (for example a quick evaluation; it
    must leave the model's weights, mode and the random streams as it found them).
    """
    import torch
    from tqdm.auto import tqdm

    set_determinism(cfg.seed, cfg.threads)
    if model is None:
        model, processor = build_model_and_processor(cfg.preset, cfg.seed, cfg.qformer_dropout, cfg.vision_init_std)
        if cfg.image_stages_from:
            copy_image_stages(model, cfg.image_stages_from)
    if dataset is None:
        dataset = SceneDataset(cfg.train_scenes, TRAIN_SEED, processor, cfg.preset.num_query_tokens,
                               encoder_decoder=cfg.preset.family == "t5")
    # Drawn after the model's weights, so the model's initialisation does not depend on it.
    aux_head = aux_heads(cfg.preset, cfg.aux_weight > 0 and cfg.slot_aux, cfg.aux_weight > 0 and cfg.shape_count_aux,
                         cfg.slot_per_query, cfg.aux_weight > 0 and cfg.order_aux,
                         cfg.aux_weight > 0 and cfg.answer_aux)
    # the first decoder layer's last two heads (`losses.pointer_loss`)
    pointer_heads = (cfg.preset.text_heads - 2, cfg.preset.text_heads - 1) if cfg.pointer_aux and cfg.aux_weight > 0 else None
    if cfg.pointer_aux and cfg.preset.family != "t5":
        raise ValueError("the pointer loss reads the T5 decoder's cross-attention: it needs family t5")
    if cfg.stage1_steps and (aux_head is None or set(aux_head) <= {"order", "answer"}):
        raise ValueError("stage1_steps > 0 trains the auxiliary heads alone: it needs aux_weight > 0 and a head")
    model.train()
    named = list(model.named_parameters()) + (list(aux_head.named_parameters()) if aux_head is not None else [])
    # T5's relative-position bias tables get their own learning rate (`position_bias_lr_scale`);
    # at 1x they stay in the decay group, so the recipes written before the option reproduce.
    scaled = cfg.position_bias_lr_scale != 1.0
    bias = [p for n, p in named if scaled and "relative_attention_bias" in n]
    rest = [(n, p) for n, p in named if not (scaled and "relative_attention_bias" in n)]
    decay = [p for n, p in rest if p.ndim >= 2 and "query_tokens" not in n]
    no_decay = [p for n, p in rest if not (p.ndim >= 2 and "query_tokens" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if bias:
        groups.append({"params": bias, "weight_decay": 0.0, "lr": cfg.lr * cfg.position_bias_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
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
            batch = dataset.batch(cfg.batch_size, cfg.caption_fraction, generator, cfg.shared_images,
                                  cfg.prefix_fraction, cfg.qa_weights)
            loss, aux = losses_for(model, batch, aux_head, cfg.position_lm_weight, pointer_heads)
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
        if on_step is not None:
            on_step(step, model, losses, aux_losses)
        if step % 10 == 0:
            shown = {"loss": f"{sum(losses[-50:]) / len(losses[-50:]):.4f}"} if losses else {}
            if aux_losses:
                shown["aux"] = f"{sum(aux_losses[-50:]) / len(aux_losses[-50:]):.4f}"
            bar.set_postfix(**shown, lr=f"{scheduler.get_last_lr()[0]:.2e}")
    seconds = time.perf_counter() - start
    model.eval()
    return model, processor, losses, aux_losses, seconds


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m blip2_triton.toy.train",
                                description="Train a tiny BLIP-2 (OPT or Flan-T5) on generated scenes (CPU, minutes).")
    p.add_argument("--family", default="opt", choices=sorted(SCENES_PRESETS),
                   help="the language model: OPT (decoder-only) or Flan-T5 (encoder-decoder)")
    p.add_argument("--output", help="checkpoint directory to write (default: the family's bundled asset)")
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
    p.add_argument("--order-aux", action=argparse.BooleanOptionalAction, default=d.order_aux,
                   help="T5: auxiliary loss on each object a position question names: its rank left to right")
    p.add_argument("--answer-aux", action=argparse.BooleanOptionalAction, default=d.answer_aux,
                   help="T5: auxiliary loss on a position question's answer, read at the prompt's last encoder token")
    p.add_argument("--pointer-aux", action=argparse.BooleanOptionalAction, default=d.pointer_aux,
                   help="T5: auxiliary loss pointing two heads of the decoder's first cross-attention at the "
                        "two objects a position question names")
    p.add_argument("--position-bias-lr-scale", type=float, default=d.position_bias_lr_scale,
                   help="T5: learning rate of the relative-position bias tables, as a multiple of --lr")
    p.add_argument("--position-lm-weight", type=float, default=d.position_lm_weight,
                   help="T5: weight of the LM loss of position questions' tokens")
    p.add_argument("--vision-init-std", type=float, default=d.vision_init_std)
    p.add_argument("--aux-weight", type=float, default=d.aux_weight, help="auxiliary slot loss weight; 0: LM loss only")
    p.add_argument("--patch-size", type=int, default=d.preset.patch_size)
    p.add_argument("--vision-hidden", type=int, default=d.preset.vision_hidden)
    p.add_argument("--vision-layers", type=int, default=d.preset.vision_layers)
    p.add_argument("--text-layers", type=int, default=None,
                   help="language-model layers (T5: encoder layers; default: the family's preset)")
    p.add_argument("--num-query-tokens", type=int, default=d.preset.num_query_tokens)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--eval-scenes", type=int, default=d.eval_scenes, help="held-out scenes to evaluate; 0 skips")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="continue from a checkpoint this script wrote (its architecture; fresh optimizer and lr cycle)")
    p.add_argument("--prefix-fraction", type=float, default=d.prefix_fraction,
                   help="T5: fraction of captions split into an encoder prefix and a decoder suffix (prefix LM)")
    p.add_argument("--qa-weight", action="append", default=[], metavar="KIND=W",
                   help="draw questions of this kind W times as often as the others (repeatable; needs --shared-images)")
    p.add_argument("--image-stages-from", default=None, metavar="DIR",
                   help="start the vision tower, Q-Former and queries from this checkpoint's (same image-stage sizes)")
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
    if TinyPreset(**previous["config"]["preset"]) != cfg.preset:
        raise SystemExit(f"--init-from {source}: its architecture differs from the one the flags describe")
    previous.pop("evaluation", None)
    model = Blip2ForConditionalGeneration.from_pretrained(source)
    processor = AutoProcessor.from_pretrained(source)
    return model, processor, previous


def config_from_log(log: dict) -> TrainConfig:
    """The TrainConfig a run recorded in its training_log.json."""
    return TrainConfig(**{**log["config"], "preset": TinyPreset(**log["config"]["preset"])})


def parse_qa_weights(items: list[str]) -> dict[str, float] | None:
    """`["position=4"]` -> {"position": 4.0}; None for no items."""
    weights = {}
    for item in items:
        kind, sep, value = item.partition("=")
        if not sep or kind not in QA_KINDS:
            raise SystemExit(f"--qa-weight {item!r}: give KIND=W with KIND one of {', '.join(QA_KINDS)}")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise SystemExit(f"--qa-weight {item!r}: W must be a number") from None
        if weights[kind] <= 0:
            raise SystemExit(f"--qa-weight {item!r}: W must be positive")
    return weights or None


def config_from_args(args) -> TrainConfig:
    preset = dataclasses.replace(
        SCENES_PRESETS[args.family], patch_size=args.patch_size, vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers, num_query_tokens=args.num_query_tokens,
        text_layers=args.text_layers or SCENES_PRESETS[args.family].text_layers,
    )
    cfg = TrainConfig(
        output=args.output or str(TRAINED_MODELS[args.family]), steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, warmup_steps=args.warmup_steps, caption_fraction=args.caption_fraction,
        train_scenes=args.train_scenes, seed=args.seed, threads=args.threads, eval_scenes=args.eval_scenes,
        qformer_dropout=args.qformer_dropout, shared_images=args.shared_images, min_lr_ratio=args.min_lr_ratio,
        aux_weight=args.aux_weight, vision_init_std=args.vision_init_std, slot_aux=args.slot_aux,
        shape_count_aux=args.shape_count_aux, stage1_steps=args.stage1_steps, slot_per_query=args.slot_per_query,
        order_aux=args.order_aux, answer_aux=args.answer_aux, pointer_aux=args.pointer_aux,
        position_bias_lr_scale=args.position_bias_lr_scale, position_lm_weight=args.position_lm_weight,
        init_from=args.init_from, image_stages_from=args.image_stages_from, preset=preset,
        prefix_fraction=args.prefix_fraction, qa_weights=parse_qa_weights(args.qa_weight),
    )
    if not 0.0 <= cfg.caption_fraction <= 1.0:
        raise SystemExit("--caption-fraction must be between 0 and 1")
    if cfg.prefix_fraction and preset.family != "t5":
        raise SystemExit("--prefix-fraction is for encoder-decoder LMs (--family t5)")
    if cfg.position_lm_weight != 1.0 and preset.family != "t5":
        raise SystemExit("--position-lm-weight is for encoder-decoder LMs (--family t5)")
    if cfg.position_bias_lr_scale != 1.0 and preset.family != "t5":
        raise SystemExit("--position-bias-lr-scale is for T5's relative-position bias (--family t5)")
    if cfg.position_bias_lr_scale <= 0:
        raise SystemExit("--position-bias-lr-scale must be positive")
    if cfg.qa_weights and not cfg.shared_images:
        raise SystemExit("--qa-weight draws each scene's question by weight: it needs --shared-images")
    if cfg.init_from and cfg.image_stages_from:
        raise SystemExit("--init-from continues a whole checkpoint; --image-stages-from starts a fresh one: give one")
    return cfg


def train_main(argv: list[str] | None = None, on_step=None) -> int:
    """CLI entry point: train, save the checkpoint, loss curve, log and model card, evaluate.

    `on_step`: passed to `train` (a probe script's progress check; the CLI has none)."""
    from .evaluation import GenerateAnswerer, evaluate

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    argv_shown = sys.argv[1:] if argv is None else argv
    command = "python -m blip2_triton.toy.train " + " ".join(argv_shown)
    output = Path(cfg.output)

    model = processor = previous = None
    if cfg.init_from:
        model, processor, previous = load_for_finetuning(cfg)
    model, processor, losses, aux_losses, seconds = train(cfg, progress=not args.no_progress, model=model,
                                                          processor=processor, on_step=on_step)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    print(f"trained {cfg.steps} steps in {seconds:.0f} s, final loss {final_loss:.4f}; wrote {output}")
    if previous is None:
        plot_losses(losses, output / "loss_curve.png",
                    f"{output.name}: {cfg.stage1_steps} + {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, seed {cfg.seed}",
                    aux_losses)
    else:
        base = previous["config"]
        plot_losses(previous["losses"] + losses, output / "loss_curve.png",
                    f"{output.name}: {base['stage1_steps']} + {base['steps']} + {cfg.steps} steps, seed {cfg.seed}",
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
        base = None if previous is None else config_from_log(previous)
        write_model_card(output, cfg, command, seconds, params, report, machine, final_loss, previous, base)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())