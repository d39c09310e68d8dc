"""The model and sample images that ship with the project (no download needed)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TRAINED_MODEL = ASSETS / "blip2-tiny-scenes"
SAMPLES = ASSETS / "samples"


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str
    question: str  # the full VQA prompt
    answer: str


def default_checkpoint(cache: Path | str) -> Path:
    """The trained tiny scene model when it is present, else a random tiny BLIP-2 built into `cache`."""
    if (TRAINED_MODEL / "model.safetensors").exists():
        return TRAINED_MODEL
    from .presets import build_tiny_checkpoint

    target = Path(cache) / "tiny-opt"
    if not (target / "model.safetensors").exists():
        build_tiny_checkpoint(target)
    return target


def samples() -> list[Sample]:
    data = json.loads((SAMPLES / "samples.json").read_text())
    return [
        Sample(SAMPLES / s["file"], s["caption"], s["question"]["prompt"], s["question"]["answer"])
        for s in data["samples"]
    ]
