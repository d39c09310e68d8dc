"""The trained models and sample images that ship with the project (no download needed)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# One trained scene model per language-model family; the OPT one is the default.
TRAINED_MODELS = {"opt": ASSETS / "blip2-tiny-scenes", "t5": ASSETS / "blip2-tiny-scenes-t5"}
TRAINED_MODEL = TRAINED_MODELS["opt"]
# The image-text retrieval sibling of the OPT model (Blip2ForImageTextRetrieval: ITC + ITM).
RETRIEVAL_MODEL = ASSETS / "blip2-tiny-scenes-itm"
SAMPLES = ASSETS / "samples"


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str
    question: str  # the full VQA prompt
    answer: str


def default_checkpoints(cache: Path | str) -> dict[str, Path]:
    """Family -> the trained scene model of that family when it is present, else a random tiny
    BLIP-2 of the family's parity preset (`tiny-opt`, `tiny-t5`) built into `cache`."""
    from .presets import build_tiny_checkpoint

    found = {}
    for family, trained in TRAINED_MODELS.items():
        if (trained / "model.safetensors").exists():
            found[family] = trained
            continue
        target = Path(cache) / f"tiny-{family}"
        if not (target / "model.safetensors").exists():
            build_tiny_checkpoint(target, f"tiny-{family}")
        found[family] = target
    return found


def samples() -> list[Sample]:
    data = json.loads((SAMPLES / "samples.json").read_text())
    return [
        Sample(SAMPLES / s["file"], s["caption"], s["question"]["prompt"], s["question"]["answer"])
        for s in data["samples"]
    ]
