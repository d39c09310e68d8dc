"""BLIP-2's image processor in numpy and Pillow: the checkpoint's BlipImageProcessor settings, applied
as transformers applies them, without importing transformers (which imports torch).

The `preprocess` model needs nothing else from transformers; importing it made that process map
libtorch and hold hundreds of MiB for no weights (README.md, "Server memory"). The
output equals transformers' processor bit for bit (tests/test_serving_units.py), because the
operations are the same ones in the same order and dtypes: Pillow resizes the uint8 RGB image,
rescaling multiplies in float64 and rounds to float32, normalization subtracts and divides in
float32.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The files a checkpoint keeps its image processor's settings in (transformers 5, then 4).
CONFIG_FILES = (("processor_config.json", "image_processor"), ("preprocessor_config.json", None))
SUPPORTED = ("BlipImageProcessor", "BlipImageProcessorPil", "BlipImageProcessorFast")


class UnsupportedImageProcessor(ValueError):
    """The checkpoint asks for an image processing step this implementation does not have."""


@dataclass(frozen=True)
class ImageProcessor:
    height: int
    width: int
    resample: int  # a Pillow resampling filter (3: bicubic)
    do_resize: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ImageProcessor":
        """The settings saved with a checkpoint; UnsupportedImageProcessor for any other processor type
        or a step BLIP-2's processor does not take (center crop, padding)."""
        settings = _read_settings(Path(directory))
        kind = settings.get("image_processor_type", "BlipImageProcessor")
        if kind not in SUPPORTED:
            raise UnsupportedImageProcessor(f"{directory}: image processor {kind!r}, expected one of {SUPPORTED}")
        for step in ("do_center_crop", "do_pad"):
            if settings.get(step):
                raise UnsupportedImageProcessor(f"{directory}: {step} is set; BLIP-2's processor does not take it")
        size = settings.get("size", {"height": 384, "width": 384})
        if set(size) != {"height", "width"}:
            raise UnsupportedImageProcessor(f"{directory}: size {size}; expected {{'height', 'width'}}")
        return cls(
            height=int(size["height"]), width=int(size["width"]), resample=int(settings.get("resample", 3)),
            do_resize=bool(settings.get("do_resize", True)), do_rescale=bool(settings.get("do_rescale", True)),
            rescale_factor=float(settings.get("rescale_factor", 1 / 255)),
            do_normalize=bool(settings.get("do_normalize", True)),
            mean=tuple(settings.get("image_mean", OPENAI_CLIP_MEAN)), std=tuple(settings.get("image_std", OPENAI_CLIP_STD)),
        )

    def __call__(self, images) -> np.ndarray:
        """RGB PIL images -> float32 [N, 3, height, width]."""
        return np.stack([self.one(image) for image in images]).astype(np.float32, copy=False)

    def one(self, image) -> np.ndarray:
        """One RGB PIL image -> [3, height, width] (float32, or uint8 with neither rescale nor normalize)."""
        image = image.convert("RGB")
        if self.do_resize:
            image = image.resize((self.width, self.height), resample=self.resample)
        pixels = np.moveaxis(np.asarray(image), -1, 0)
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = pixels.astype(np.float32, copy=False)
            mean, std = np.array(self.mean, np.float32), np.array(self.std, np.float32)
            pixels = ((pixels.T - mean) / std).T
        return pixels


# transformers' defaults for BLIP's processor (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _read_settings(directory: Path) -> dict:
    for name, key in CONFIG_FILES:
        path = directory / name
        if path.exists():
            data = json.loads(path.read_text())
            if key is None:
                return data
            if key in data:
                return data[key]
    raise FileNotFoundError(f"{directory}: no image processor settings ({', '.join(n for n, _ in CONFIG_FILES)})")
