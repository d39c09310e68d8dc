"""The retrieval sibling of the scenes model: a Blip2ForImageTextRetrieval trained on the generated
scenes with BLIP-2's stage-1 losses (image-text contrastive and image-text matching), and its
evaluation (text -> image recall@1, ITM accuracy on one-attribute mismatches).

Its vision tower, learned queries and Q-Former start from the bundled captioning model
(`blip2-tiny-scenes`), which already reads shapes, colors and order; the image encoder stays
frozen, as in BLIP-2's stage 1. The Q-Former's text feed-forwards start as its query half's (BLIP-2
starts both from BERT); the text embeddings, projections and the ITM head start fresh.

    python -m blip2_triton.toy.retrieval train --threads 1          # writes the asset (model card: its README)
    python -m blip2_triton.toy.retrieval evaluate --served          # the issue's yardstick, through tritonserver
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .embedded import RETRIEVAL_MODEL, TRAINED_MODEL
from .scenes import HELDOUT_SEED, OBJECT_COLORS, SHAPES, TRAIN_SEED, SceneObject, caption_for, generate_scenes

RECALL_TARGET, ITM_TARGET = 0.90, 0.95  # issue 13, over >= 500 held-out scenes


@dataclass(frozen=True)
class RetrievalTrainConfig:
    output: str = str(RETRIEVAL_MODEL)
    init_from: str = str(TRAINED_MODEL)
    steps: int = 1500
    batch_size: int = 48
    lr: float = 3e-4
    warmup_steps: int = 50
    train_scenes: int = 12000
    embed_dim: int = 64  # image_text_hidden_size
    max_text_tokens: int = 32  # the Q-Former's text positions: captions are at most ~16 tokens
    easy_negatives: float = 0.5  # share of the in-batch ITM negatives drawn uniformly rather than by ITC
    seed: int = 0
    threads: int = 1


# ---- one-attribute mismatches --------------------------------------------------------------------
def perturbed_caption(objects: tuple[SceneObject, ...], rng: random.Random) -> tuple[str, str]:
    """(kind, caption) of the scene with one attribute changed: one object's colour or shape, or
    the count (one object more or fewer). The result never equals the true caption."""
    objects = list(objects)
    kind = rng.choice(("colour", "shape", "count"))
    taken = {(o.color, o.shape) for o in objects}
    i = rng.randrange(len(objects))
    o = objects[i]
    if kind == "colour":
        choices = [c for c in OBJECT_COLORS if c != o.color and (c, o.shape) not in taken]
        objects[i] = SceneObject(o.shape, rng.choice(choices), o.x, o.y, o.size)
    elif kind == "shape":
        choices = [s for s in SHAPES if s != o.shape and (o.color, s) not in taken]
        if not choices:  # every shape of this colour is in the scene: change the colour instead
            return perturbed_caption(tuple(objects), rng)
        objects[i] = SceneObject(rng.choice(choices), o.color, o.x, o.y, o.size)
    elif len(objects) > 1 and rng.random() < 0.5:
        del objects[i]
    else:
        free = [(c, s) for c in OBJECT_COLORS for s in SHAPES if (c, s) not in taken]
        c, s = rng.choice(free)
        objects.insert(rng.randrange(len(objects) + 1), SceneObject(s, c, 0, 0, 0))
        return kind, _caption_in_order(objects)
    return kind, caption_for(objects)


def _caption_in_order(objects: list[SceneObject]) -> str:
    names = [o.with_article for o in objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ---- the model --------------------------------------------------------------------------------------
def build_from_captioner(cfg: RetrievalTrainConfig):
    """A Blip2ForImageTextRetrieval (and its processor) whose image stages come from the captioner
    (or, when `init_from` is a retrieval checkpoint, that checkpoint as it is)."""
    import torch
    from transformers import AutoProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    from .presets import build_processor
    from .tokenizer import build_bert_tokenizer

    if "Blip2ForImageTextRetrieval" in json.loads((Path(cfg.init_from) / "config.json").read_text())["architectures"]:
        # a retrieval checkpoint already: continue its training (another run's schedule)
        return Blip2ForImageTextRetrieval.from_pretrained(cfg.init_from), AutoProcessor.from_pretrained(cfg.init_from)
    source = Blip2ForConditionalGeneration.from_pretrained(cfg.init_from)
    image_processor = AutoProcessor.from_pretrained(cfg.init_from).image_processor
    processor = build_processor(build_bert_tokenizer(), image_processor.size["height"], None)
    c = source.config
    qformer = c.qformer_config.to_dict() | dict(
        vocab_size=len(processor.tokenizer), max_position_embeddings=cfg.max_text_tokens, use_qformer_text_input=True,
        pad_token_id=processor.tokenizer.pad_token_id)
    config = Blip2Config(vision_config=c.vision_config.to_dict(), qformer_config=qformer,
                         text_config=c.text_config.to_dict(), num_query_tokens=c.num_query_tokens,
                         image_text_hidden_size=cfg.embed_dim, initializer_range=c.initializer_range)
    config.architectures = ["Blip2ForImageTextRetrieval"]
    torch.manual_seed(cfg.seed)
    model = Blip2ForImageTextRetrieval(config)
    with torch.no_grad():
        model.vision_model.load_state_dict(source.vision_model.state_dict())
        model.query_tokens.copy_(source.query_tokens)
        missing, unexpected = model.qformer.load_state_dict(source.qformer.state_dict(), strict=False)
        if unexpected or any("_query" in m for m in missing):
            raise RuntimeError(f"Q-Former weights do not line up: missing {missing}, unexpected {unexpected}")
        for layer in model.qformer.encoder.layer:  # the text half starts as the query half
            layer.intermediate.load_state_dict(layer.intermediate_query.state_dict())
            layer.output.load_state_dict(layer.output_query.state_dict())
    return model, processor


# ---- training -------------------------------------------------------------------------------------
def _tokens(tokenizer, texts):
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def train(cfg: RetrievalTrainConfig, progress: bool = True):
    """BLIP-2's ITC + ITM training on the scenes -> (model, processor, per-step losses, seconds).

    ITC: in-batch contrastive loss both ways, an image's score for a text being the max over its
    query vectors (scenes with the same caption count as positives). ITM: each image with its
    caption, with a hard negative caption drawn by ITC similarity (BLIP-2's own mining) or at random, and with
    its caption changed in one attribute (what the evaluation asks the head to tell apart).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model, processor = build_from_captioner(cfg)
    tokenizer = processor.tokenizer
    scenes = generate_scenes(cfg.train_scenes, TRAIN_SEED)
    ip = processor.image_processor
    pixels = torch.from_numpy(np.stack([np.asarray(s.image) for s in scenes])).permute(0, 3, 1, 2).contiguous()
    mean, std = torch.tensor(ip.image_mean).view(1, 3, 1, 1), torch.tensor(ip.image_std).view(1, 3, 1, 1)
    # The image encoder stays frozen, as in BLIP-2's stage 1: its outputs are computed once.
    model.vision_model.requires_grad_(False).eval()
    with torch.no_grad():
        vision = torch.cat([model.vision_model(pixel_values=(pixels[i : i + 256].float() / 255.0 - mean) / std).last_hidden_state
                            for i in range(0, len(scenes), 256)])
    del pixels
    temp = torch.nn.Parameter(torch.tensor(0.07))
    params = [p for p in model.parameters() if p.requires_grad] + [temp]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (1 + np.cos(np.pi * s / cfg.steps)))
    model.train()
    model.vision_model.eval()
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train itc+itm", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        index = [rng.randrange(len(scenes)) for _ in range(cfg.batch_size)]
        captions = [scenes[i].caption for i in index]
        image_embeds = vision[index]
        queries = model.query_tokens.expand(len(index), -1, -1)
        q = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
        image_feats = F.normalize(model.vision_projection(q), dim=-1)  # [B, Q, D]
        ids, mask = _tokens(tokenizer, captions)
        t = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state
        text_feats = F.normalize(model.text_projection(t[:, 0]), dim=-1)  # [B, D]
        with torch.no_grad():
            temp.clamp_(0.001, 0.5)
        sim = torch.einsum("iqd,td->itq", image_feats, text_feats).max(-1).values / temp  # [B images, B texts]
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        itc = (-(F.log_softmax(sim, 1) * targets).sum(1).mean() - (F.log_softmax(sim.t(), 1) * targets).sum(1).mean()) / 2

        with torch.no_grad():  # a negative caption per image: drawn by ITC similarity (BLIP-2's hard
            # negatives) or, for a share of the images, uniformly: the easy pairs are what first
            # teaches the queries to read the text at all (the text embeddings start untrained)
            hard = F.softmax(sim.float(), 1)
            easy = torch.rand(len(index), 1) < cfg.easy_negatives
            weights = torch.where(easy, torch.ones_like(hard), hard).masked_fill(same.bool(), 0) + 1e-9
            negative = torch.multinomial(weights, 1).squeeze(1).tolist()
        changed = [perturbed_caption(scenes[i].objects, rng)[1] for i in index]
        texts = captions + [captions[j] for j in negative] + changed
        labels = torch.tensor([1] * len(index) + [0] * (2 * len(index)))
        ids, mask = _tokens(tokenizer, texts)
        embeds3 = image_embeds.repeat(3, 1, 1)
        queries3 = model.query_tokens.expand(len(texts), -1, -1)
        full_mask = torch.cat([torch.ones(queries3.shape[:-1], dtype=mask.dtype), mask], 1)
        out = model.qformer(query_embeds=model.embeddings(input_ids=ids, query_embeds=queries3),
                            query_length=queries3.shape[1], attention_mask=full_mask,
                            encoder_hidden_states=embeds3).last_hidden_state
        logits = model.itm_head(out[:, : queries3.shape[1]]).mean(1)
        itm = F.cross_entropy(logits, labels)
        loss = itc + itm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append({"itc": itc.item(), "itm": itm.item()})
        if len(losses) % 10 == 0:
            recent = losses[-50:]
            bar.set_postfix(itc=f"{sum(x['itc'] for x in recent) / len(recent):.3f}",
                            itm=f"{sum(x['itm'] for x in recent) / len(recent):.3f}")
    model.eval()
    return model, processor, losses, time.perf_counter() - start


# ---- evaluation ------------------------------------------------------------------------------------
@dataclass
class RetrievalReport:
    scenes: int
    recall_at_1: float  # text -> image over the whole gallery; a hit is a top image with the query's caption
    itm_accuracy: float  # matched and one-attribute mismatched pairs, "match" when the probability > 0.5
    itm_accuracy_by_kind: dict  # "matched", "colour", "shape", "count"

    def table(self) -> str:
        rows = ["| metric | value | target |", "|---|---|---|",
                f"| text -> image recall@1 ({self.scenes}-image gallery) | {self.recall_at_1:.3f} | >= {RECALL_TARGET} |",
                f"| ITM accuracy ({2 * self.scenes} pairs: matched + one attribute changed) | {self.itm_accuracy:.3f} | >= {ITM_TARGET} |"]
        rows += [f"| ITM accuracy, {k} pairs | {v:.3f} | |" for k, v in self.itm_accuracy_by_kind.items()]
        return "\n".join(rows)

    @property
    def meets_targets(self) -> bool:
        return self.recall_at_1 >= RECALL_TARGET and self.itm_accuracy >= ITM_TARGET


def evaluate(calls, n: int = 500, seed: int = HELDOUT_SEED) -> RetrievalReport:
    """The issue's yardstick on `n` held-out scenes, for any implementation of the three calls
    (`TransformersCalls`, `ServedCalls`):

    - recall@1: each scene's caption ranks the whole gallery by ITC similarity (the max over an
      image's query vectors); a hit is a top image whose caption is the query's (captions repeat
      across scenes, and such images are equally right);
    - ITM accuracy: each scene with its caption and with that caption changed in one attribute
      (`perturbed_caption`: colour, shape or count), right when the probability is > 0.5 for the
      first and <= 0.5 for the second.
    """
    import numpy as np

    scenes = generate_scenes(n, seed)
    images = [s.image for s in scenes]
    captions = [s.caption for s in scenes]
    gallery = np.asarray(calls.embed_images(images))  # [N, Q, D]
    unique = list(dict.fromkeys(captions))
    texts = dict(zip(unique, np.asarray(calls.embed_texts(unique))))  # caption -> [D]
    hits = sum(captions[int(np.argmax((gallery @ texts[c]).max(-1)))] == c for c in captions)
    rng = random.Random(seed)
    wrong = [perturbed_caption(s.objects, rng) for s in scenes]
    probs = calls.itm(images + images, captions + [text for _, text in wrong])
    right = {"matched": [p > 0.5 for p in probs[:n]]}
    for (kind, _), p in zip(wrong, probs[n:]):
        right.setdefault(kind, []).append(p <= 0.5)
    correct = sum(sum(v) for v in right.values())
    return RetrievalReport(n, hits / n, correct / (2 * n),
                           {k: sum(v) / len(v) for k, v in sorted(right.items())})


class TransformersCalls:
    """The three calls with transformers' Blip2ForImageTextRetrieval (the oracle), in batches."""

    def __init__(self, model_dir, batch_size: int = 64):
        from transformers import AutoProcessor, Blip2ForImageTextRetrieval

        self.model = Blip2ForImageTextRetrieval.from_pretrained(model_dir).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.batch_size = batch_size

    def _run(self, images, texts, itm: bool):
        import torch

        out = []
        for i in range(0, len(images), self.batch_size):
            inputs = self.processor(images=images[i : i + self.batch_size], text=texts[i : i + self.batch_size],
                                    padding=True, return_tensors="pt")
            with torch.no_grad():
                r = self.model(**inputs, use_image_text_matching_head=itm)
            out.append(r.logits_per_image.softmax(1)[:, 1].numpy() if itm else (r.image_embeds.numpy(), r.text_embeds.numpy()))
        return out

    def embed_images(self, images):
        import numpy as np

        return np.concatenate([i for i, _ in self._run(images, ["a"] * len(images), False)])

    def embed_texts(self, texts):
        import numpy as np
        from PIL import Image

        size = self.model.config.vision_config.image_size
        blank = [Image.new("RGB", (size, size))] * len(texts)  # forward() needs an image; text embeds ignore it
        return np.concatenate([t for _, t in self._run(blank, texts, False)])

    def itm(self, images, texts):
        import numpy as np

        return np.concatenate(self._run(images, texts, True)).tolist()


class ServedCalls:
    """The three calls through a running server (an exported retrieval checkpoint), each request
    one call, `concurrency` of them in flight so the server's stages batch them."""

    def __init__(self, client, concurrency: int = 64):
        self.client, self.concurrency = client, concurrency

    def _map(self, fn, *args):
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, *args))

    def embed_images(self, images):
        return self._map(self.client.embed_image, images)

    def embed_texts(self, texts):
        return self._map(self.client.embed_text, texts)

    def matches(self, images, texts):
        """`Match` (ITM probability, ITC similarity) of each image with its text."""
        return self._map(self.client.match, images, texts)

    def itm(self, images, texts):
        return [m.itm_probability for m in self.matches(images, texts)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blip2_triton.toy.retrieval")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    for name, value in asdict(RetrievalTrainConfig()).items():
        t.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    t.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("evaluate")
    e.add_argument("--model", default=str(RETRIEVAL_MODEL), help="the retrieval checkpoint")
    where = e.add_mutually_exclusive_group()
    where.add_argument("--served", action="store_true",
                       help="export --model (fp32, validated), start tritonserver and evaluate through it")
    where.add_argument("--url", help="evaluate through this running server (gRPC host:port)")
    e.add_argument("--scenes", type=int, default=500)
    args = p.parse_args(argv)
    if args.command == "train":
        cfg = RetrievalTrainConfig(**{k: getattr(args, k) for k in asdict(RetrievalTrainConfig())})
        model, processor, losses, seconds = train(cfg, progress=not args.no_progress)
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        command = "python -m blip2_triton.toy.retrieval " + " ".join(sys.argv[1:] if argv is None else argv)
        runs = _earlier_runs(Path(cfg.init_from)) + [
            {"config": asdict(cfg), "command": command, "seconds": seconds, "losses": losses}]
        (out / "training_log.json").write_text(json.dumps({"runs": runs}) + "\n")
        plot_losses(runs, out / "loss_curve.png")
        print(f"trained {cfg.steps} steps in {seconds:.0f} s; wrote {out}")
        return 0
    if args.served:
        report = evaluate_served(Path(args.model), args.scenes)
    elif args.url:
        from blip2_triton.client import Blip2Client

        with Blip2Client(args.url, timeout=120) as client:
            report = evaluate(ServedCalls(client), n=args.scenes)
    else:
        report = evaluate(TransformersCalls(args.model), n=args.scenes)
    print(report.table())
    return 0 if report.meets_targets else 1


def evaluate_served(model_dir: Path, n: int = 500) -> RetrievalReport:
    """`evaluate` through tritonserver serving a fresh fp32 export of `model_dir`."""
    import tempfile

    from blip2_triton.client import Blip2Client
    from blip2_triton.export.exporter import export_checkpoint
    from blip2_triton.server.launcher import TritonServer

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repository"
        export_checkpoint(model_dir, repo, progress=False)
        with TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None, log_file=Path(tmp) / "server.log") as server:
            with Blip2Client(server.grpc_url, timeout=120) as client:
                return evaluate(ServedCalls(client), n=n)


def _earlier_runs(init_from: Path) -> list[dict]:
    """The training runs a continued run builds on (those of a retrieval checkpoint it starts from)."""
    log = init_from / "training_log.json"
    return json.loads(log.read_text())["runs"] if log.is_file() else []


def plot_losses(runs: list[dict], path: Path, window: int = 50) -> None:
    """ITC and ITM loss per step and their running means, over the runs one after the other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [x for run in runs for x in run["losses"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    start = 0
    for run in runs[:-1]:
        start += len(run["losses"])
        ax.axvline(start, color="gray", linestyle="--", linewidth=0.8)
    for key, color in (("itc", "tab:blue"), ("itm", "tab:orange")):
        v = [x[key] for x in losses]
        mean = [sum(v[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(v))]
        ax.plot(v, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(mean, color=color, linewidth=1.5, label=f"{key.upper()} loss, mean of last {window}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("blip2-tiny-scenes-itm: ITC + ITM training")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
