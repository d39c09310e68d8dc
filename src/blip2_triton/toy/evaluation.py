"""Caption exact match and VQA accuracy per question type on held-out generated scenes.

The metric code only sees an *answerer*: any callable `answer(image, prompt) -> text`, where
`prompt` is "" for a caption and "Question: ... Answer:" for VQA. The same evaluation therefore
runs against transformers `generate()` (`GenerateAnswerer`), an exported model repository run
in-process (`PipelineAnswerer`: the served graphs and decoding, without Triton) or a running
Triton server (`ClientAnswerer`). An answerer may also offer `answer_batch(images, prompts) ->
texts`, which is used when present.

    python -m blip2_triton.toy.evaluation --model src/blip2_triton/assets/blip2-tiny-scenes --scenes 200
    python -m blip2_triton.toy.evaluation --repository artifacts/repo-fp16 --scenes 200
    python -m blip2_triton.toy.evaluation --url localhost:8001 --scenes 200
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from .scenes import HELDOUT_SEED, QA_KINDS, Scene, generate_scenes

CAPTION = "caption"
CAPTION_PROMPT = ""
KINDS = (CAPTION, *QA_KINDS)
# What every embedded trained model is meant to reach on held-out scenes: caption exact match,
# and VQA accuracy on each question type.
CAPTION_TARGET, VQA_TARGET = 0.90, 0.95

AnswerFn = Callable[[Image.Image, str], str]


@dataclass(frozen=True)
class EvalItem:
    """One prompt to answer about one scene, with the single correct answer."""

    scene_seed: int
    kind: str
    prompt: str
    expected: str


@dataclass(frozen=True)
class Miss:
    scene_seed: int
    kind: str
    prompt: str
    expected: str
    got: str


@dataclass
class EvalReport:
    """Per-kind counts; `accuracy(kind)` is correct / total (NaN-free: 0 items -> 0.0)."""

    correct: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    total: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    misses: list[Miss] = field(default_factory=list)
    num_scenes: int = 0

    def accuracy(self, kind: str) -> float:
        return self.correct[kind] / self.total[kind] if self.total[kind] else 0.0

    @property
    def vqa_accuracy(self) -> float:
        """Accuracy over all VQA questions together (every kind but captions)."""
        total = sum(self.total[k] for k in QA_KINDS)
        return sum(self.correct[k] for k in QA_KINDS) / total if total else 0.0

    def rows(self) -> list[tuple[str, int, int, float]]:
        rows = [(k, self.correct[k], self.total[k], self.accuracy(k)) for k in KINDS]
        vqa_total = sum(self.total[k] for k in QA_KINDS)
        rows.append(("vqa (all)", sum(self.correct[k] for k in QA_KINDS), vqa_total, self.vqa_accuracy))
        return rows

    def table(self) -> str:
        """A Markdown table: metric, correct, total, accuracy."""
        lines = ["| metric | correct | total | accuracy |", "|---|---:|---:|---:|"]
        for kind, correct, total, acc in self.rows():
            name = "caption exact match" if kind == CAPTION else f"VQA {kind}" if kind in QA_KINDS else "VQA all types"
            lines.append(f"| {name} | {correct} | {total} | {100 * acc:.1f}% |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "num_scenes": self.num_scenes,
            "accuracy": {k: self.accuracy(k) for k in KINDS} | {"vqa_all": self.vqa_accuracy},
            "correct": self.correct,
            "total": self.total,
            "misses": [asdict(m) for m in self.misses],
        }


def comparison_table(reports: dict[str, dict]) -> str:
    """A Markdown table of accuracy per metric, one column per named report (`EvalReport.to_dict()`)."""
    names = list(reports)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in (*KINDS, "vqa_all"):
        label = "caption exact match" if key == CAPTION else "VQA all types" if key == "vqa_all" else f"VQA {key}"
        lines.append(f"| {label} | " + " | ".join(f"{100 * reports[n]['accuracy'][key]:.1f}%" for n in names) + " |")
    return "\n".join(lines)


def normalize(text: str) -> str:
    """Compare answers case-, whitespace- and final-period-insensitively."""
    return " ".join(text.strip().lower().rstrip(".").split())


def eval_items(scenes: Sequence[Scene]) -> list[EvalItem]:
    """A caption item plus every QA of each scene."""
    items: list[EvalItem] = []
    for s in scenes:
        items.append(EvalItem(s.seed, CAPTION, CAPTION_PROMPT, s.caption))
        items.extend(EvalItem(s.seed, qa.kind, qa.prompt, qa.answer) for qa in s.qa)
    return items


def evaluate(scenes: Sequence[Scene], answer: AnswerFn, batch_size: int = 32, max_misses: int = 50) -> EvalReport:
    """Ask `answer` every item of `scenes` and count exact matches (after `normalize`) per kind.

    Uses `answer.answer_batch(images, prompts)` in chunks of `batch_size` when the answerer has
    one, otherwise calls `answer(image, prompt)` item by item.
    """
    images = {s.seed: s.image for s in scenes}
    items = eval_items(scenes)
    batch_fn = getattr(answer, "answer_batch", None)
    got: list[str] = []
    if batch_fn is not None:
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            out = list(batch_fn([images[it.scene_seed] for it in chunk], [it.prompt for it in chunk]))
            if len(out) != len(chunk):
                raise RuntimeError(f"answer_batch returned {len(out)} answers for {len(chunk)} prompts")
            got.extend(out)
    else:
        got = [answer(images[it.scene_seed], it.prompt) for it in items]

    report = EvalReport(num_scenes=len(scenes))
    for it, text in zip(items, got):
        report.total[it.kind] += 1
        if normalize(text) == normalize(it.expected):
            report.correct[it.kind] += 1
        elif len(report.misses) < max_misses:
            report.misses.append(Miss(it.scene_seed, it.kind, it.prompt, it.expected, text))
    return report


class GenerateAnswerer:
    """Greedy transformers `generate()` as an answerer, batched with the processor's left padding.

    Images go through the checkpoint's own processor, which puts `num_query_tokens` `<image>`
    placeholders before the prompt (OPT: BOS-prefixed; T5: ending in </s>, and a caption's prompt
    "" is encoded as that), exactly as a served pipeline must.
    """

    def __init__(self, model, processor, max_new_tokens: int | None = None):
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "GenerateAnswerer":
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        return cls(Blip2ForConditionalGeneration.from_pretrained(path), AutoProcessor.from_pretrained(path), **kwargs)

    def __call__(self, image: Image.Image, prompt: str) -> str:
        return self.answer_batch([image], [prompt])[0]

    def answer_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        import torch

        inputs = self.processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
        # Blip2ForConditionalGeneration.generate delegates to its language model, whose own
        # generation config does not hold the checkpoint's generation_config.json: pass it on.
        config = copy.deepcopy(self.model.generation_config)
        config.do_sample, config.num_beams = False, 1
        if self.max_new_tokens is not None:
            config.max_new_tokens = self.max_new_tokens
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=config)
        # Decoder-only generate returns the prompt ids followed by the new ones; encoder-decoder
        # generate the decoder start token followed by them.
        start = inputs["input_ids"].shape[1] if self.model.config.use_decoder_only_language_model else 1
        new = out[:, start:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class PipelineAnswerer:
    """An exported model repository run in-process by `LocalPipeline` (ONNX Runtime, the served
    preprocessing, decoding and detokenization; no Triton). Greedy, the checkpoint's defaults."""

    def __init__(self, repository: str | Path, threads: int | None = None):
        from blip2_triton.serving.pipeline import LocalPipeline

        self.pipeline = LocalPipeline(repository, threads)

    def __call__(self, image: Image.Image, prompt: str) -> str:
        return self.pipeline(_png(image), prompt).text.strip()


class ClientAnswerer:
    """A running Triton server through `blip2_triton.client.Blip2Client`; each `answer_batch`
    sends its requests concurrently (`Blip2Client.batch`), so the server batches them."""

    def __init__(self, client):
        self.client = client

    def __call__(self, image: Image.Image, prompt: str) -> str:
        return self.answer_batch([image], [prompt])[0]

    def answer_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        results = self.client.batch([_png(i) for i in images], list(prompts))
        return [r.text.strip() for r in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_triton.toy.evaluation", description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--compare", nargs="+", metavar="NAME=JSON",
                       help="print one table comparing reports written earlier with --json")
    where.add_argument("--model", help="checkpoint directory (e.g. the bundled blip2-tiny-scenes): transformers generate()")
    where.add_argument("--repository", help="exported model repository, run in-process (LocalPipeline, ONNX Runtime)")
    where.add_argument("--url", help="gRPC address of a running server (e.g. localhost:8001): Blip2Client")
    parser.add_argument("--scenes", type=int, default=200, help="number of held-out scenes")
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED, help="first held-out scene seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", help="also write the report as JSON here")
    parser.add_argument("--show-misses", type=int, default=10)
    args = parser.parse_args(argv)

    if args.compare:
        pairs = [c.split("=", 1) for c in args.compare]
        if any(len(pair) != 2 for pair in pairs):
            parser.error("--compare takes NAME=JSON pairs")
        print(comparison_table({name: json.loads(Path(path).read_text()) for name, path in pairs}))
        return 0
    scenes = generate_scenes(args.scenes, args.seed)
    if args.model:
        report = evaluate(scenes, GenerateAnswerer.from_pretrained(args.model), batch_size=args.batch_size)
        how = f"greedy generate() on {args.model}"
    elif args.repository:
        report = evaluate(scenes, PipelineAnswerer(args.repository), batch_size=args.batch_size)
        how = f"exported repository {args.repository} in-process"
    else:
        from blip2_triton.client import Blip2Client

        with Blip2Client(args.url) as client:
            report = evaluate(scenes, ClientAnswerer(client), batch_size=args.batch_size)
        how = f"served at {args.url}"
    print(f"{args.scenes} held-out scenes (seeds {args.seed}..{args.seed + args.scenes - 1}), {how}")
    print(report.table())
    for m in report.misses[: args.show_misses]:
        print(f"  miss [{m.kind}] seed {m.scene_seed} {m.prompt!r}: expected {m.expected!r}, got {m.got!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
