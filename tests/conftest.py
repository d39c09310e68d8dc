"""Shared fixtures: tiny checkpoints built offline and their exported repositories, once per session."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """preset name -> checkpoint directory (built lazily)."""
    from blip2_triton.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    cache = {}

    def get(preset: str):
        if preset not in cache:
            cache[preset] = build_tiny_checkpoint(root / preset, preset)
        return cache[preset]

    return get


@pytest.fixture(scope="session")
def exported(tiny_checkpoints, tmp_path_factory):
    """preset name -> (checkpoint directory, validated model repository)."""
    from blip2_triton.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("repos")
    cache = {}

    def get(preset: str):
        if preset not in cache:
            ckpt = tiny_checkpoints(preset)
            report = export_checkpoint(ckpt, root / preset, progress=False)
            cache[preset] = (ckpt, root / preset, report)
        return cache[preset]

    return get


def random_image(seed: int, size=(40, 52)) -> bytes:
    """A PNG of random pixels (deterministic per seed)."""
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
