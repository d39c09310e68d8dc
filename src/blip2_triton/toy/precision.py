"""Held-out accuracy of a trained checkpoint in every precision the exporter offers.

    python -m blip2_triton.toy.precision src/blip2_triton/assets/blip2-tiny-scenes [--workdir DIR]

Exports the checkpoint as fp32, fp16, int8 and int4 model repositories, evaluates each in-process
(`PipelineAnswerer`: the served preprocessing, ONNX Runtime graphs, KV-cached decoding and
detokenization) next to transformers `generate()`, writes `precision.json` into the checkpoint
and replaces the "## Precision" section of its model card (README.md). It is the yardstick every
precision change is held to (issue 5), so the card's table is regenerated, never typed in.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .evaluation import GenerateAnswerer, PipelineAnswerer, _png, comparison_table, evaluate
from .scenes import HELDOUT_SEED, generate_scenes

REFERENCE = "transformers generate() (PyTorch fp32)"
# column name -> export options
VARIANTS = {
    "exported fp32": {"dtype": "fp32"},
    "exported fp16": {"dtype": "fp16"},
    "exported int8": {"dtype": "fp32", "quantize": "int8"},
    "exported int4": {"dtype": "fp32", "quantize": "int4"},
}
SECTION = "## Precision"
AGREEMENT = "tokens_identical_to_exported_fp32"  # [items whose generated ids equal the fp32 export's, items]
BASELINE = "exported fp32"


class _RecordingAnswerer(PipelineAnswerer):
    """PipelineAnswerer that keeps each answer's token ids, in the order asked."""

    def __init__(self, repository: Path):
        super().__init__(repository)
        self.token_ids: list[list[int]] = []

    def __call__(self, image, prompt: str) -> str:
        result = self.pipeline(_png(image), prompt)
        self.token_ids.append(result.token_ids)
        return result.text.strip()


def measure(checkpoint: Path, workdir: Path, scenes: int = 200) -> dict[str, dict]:
    """Column name -> `EvalReport.to_dict()` (without the misses) on `scenes` held-out scenes."""
    from blip2_triton.export.exporter import export_checkpoint

    held_out = generate_scenes(scenes, HELDOUT_SEED)
    reports = {REFERENCE: evaluate(held_out, GenerateAnswerer.from_pretrained(checkpoint), batch_size=64)}
    tokens = {}
    for name, options in VARIANTS.items():
        repo = workdir / name.replace(" ", "-")
        export_checkpoint(str(checkpoint), repo, progress=False, **options)
        answerer = _RecordingAnswerer(repo)
        reports[name] = evaluate(held_out, answerer, batch_size=64)
        tokens[name] = answerer.token_ids
        print(f"{name}: VQA {reports[name].vqa_accuracy:.1%}, caption {reports[name].accuracy('caption'):.1%}",
              flush=True)
    out = {name: {k: v for k, v in r.to_dict().items() if k != "misses"} for name, r in reports.items()}
    for name, ids in tokens.items():
        if name != BASELINE:
            out[name][AGREEMENT] = [sum(a == b for a, b in zip(ids, tokens[BASELINE])), len(ids)]
    return out


def card_section(reports: dict[str, dict]) -> str:
    scenes = next(iter(reports.values()))["num_scenes"]
    agreement = ", ".join(f"{name.removeprefix('exported ')} {r[AGREEMENT][0]} of {r[AGREEMENT][1]}"
                          for name, r in reports.items() if AGREEMENT in r) or "not measured"
    return f"""{SECTION}

The same {scenes} held-out scenes through the exported graphs, run in-process with the served
preprocessing, ONNX Runtime graphs, KV-cached greedy decoding and detokenization (`LocalPipeline`):
fp32, `--dtype fp16` (ONNX Runtime's CPU provider; the Q-Former stays fp32 inside its graph) and
`--quantize int8` (int8 MatMul weights) and `--quantize int4` (4-bit MatMulNBits weights in the
decoder, int8 elsewhere). Made by `python -m blip2_triton.toy.precision <this directory>`;
raw numbers: `precision.json`. Through the real Triton server the answers are those of
transformers `generate()`, item for item (`tests/test_scenes_served.py`).

{comparison_table(reports)}

Generated tokens identical to the exported fp32 graphs', item for item: {agreement}.
"""


def update_card(checkpoint: Path, reports: dict[str, dict]) -> None:
    card_path = checkpoint / "README.md"
    card = card_path.read_text()
    if SECTION in card:  # the section runs to the next "## " heading or the end
        start = card.index(SECTION)
        end = card.find("\n## ", start + len(SECTION))
        card = card[:start] + card[end + 1 if end >= 0 else len(card):]
    card_path.write_text(card.rstrip("\n") + "\n\n" + card_section(reports))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_triton.toy.precision", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint with a model card (README.md)")
    parser.add_argument("--workdir", type=Path, help="where the exported repositories go (default: a temporary directory)")
    parser.add_argument("--scenes", type=int, default=200)
    args = parser.parse_args(argv)
    if not (args.checkpoint / "README.md").is_file():
        parser.error(f"{args.checkpoint} has no model card (README.md) to update")
    with tempfile.TemporaryDirectory() as tmp:
        reports = measure(args.checkpoint, args.workdir or Path(tmp), args.scenes)
    (args.checkpoint / "precision.json").write_text(json.dumps(reports, indent=2) + "\n")
    update_card(args.checkpoint, reports)
    print(comparison_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
