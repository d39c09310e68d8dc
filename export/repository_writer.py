"""Writing a Triton model repository: every config.pbtxt (blip2_triton.repository.model_configs) and
each Python-backend model's model.py, copied from the `model_repository/` sources."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from blip2_triton import api
from blip2_triton import specs
from blip2_triton.model_repository import SOURCE_DIR
from blip2_triton.pbtxt import render
from blip2_triton.repository import (DEFAULT_IMAGE_CACHE_BYTES, IMAGE_CACHE, IMAGE_CACHE_BYTES, RETRIEVAL_GRAPHS,
                                     assets_dir, checkpoint_dir, model_configs, other_models)
from blip2_triton.sizing import Sizing

log = logging.getLogger("blip2_triton.export")

# Which model.py source (under model_repository/) serves each model.
MODEL_SOURCES = {
    api.PREPROCESS: "preprocess",
    specs.VISION_ENCODER: "onnx_graph",
    specs.QFORMER: "onnx_graph",
    api.PIPELINE: "blip2",
    api.RETRIEVAL_PREPROCESS: "preprocess",
    **{graph: "onnx_graph" for graph in RETRIEVAL_GRAPHS},
    **{call: "retrieval" for call in api.RETRIEVAL_CALLS},
}


def write_repository(
    repo: Path | str,
    config,
    float_dtype: str = "float32",
    checkpoint_files: Callable[[Path], None] | None = None,
    stateless_backend: str = "python",
    sizing: Sizing | None = None,
    image_cache_bytes: int | None = DEFAULT_IMAGE_CACHE_BYTES,
) -> Path:
    """Write every config.pbtxt and model.py into `repo` (the ONNX files are written by the exporter).
    The other kind of export's models (generation / retrieval) in `repo` stay."""
    repo = Path(repo)
    configs = model_configs(config, float_dtype, stateless_backend, sizing, image_cache_bytes)
    remove_stale_models(repo, {cfg.name for cfg in configs} | set(other_models(config)))
    for cfg in configs:
        model_dir = repo / cfg.name
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        (model_dir / "config.pbtxt").write_text(render(cfg))
        source = MODEL_SOURCES.get(cfg.name)
        if source and cfg.backend == "python":
            shutil.copyfile(SOURCE_DIR / source / "model.py", model_dir / "1" / "model.py")
    if checkpoint_files is not None:
        checkpoint_files(checkpoint_dir(repo, config))
    return repo


def remove_stale_models(repo: Path, keep: set[str]) -> None:
    """Delete models an earlier export (or an older layout) left in `repo`: Triton loads every
    folder with a config.pbtxt, and a stale one would fail the server's start."""
    if not repo.is_dir():
        return
    for config in repo.glob("*/config.pbtxt"):
        if config.parent.name not in keep:
            log.warning("removing stale model %s", config.parent)
            shutil.rmtree(config.parent)


_KEEP = object()


def resize_repository(repo: Path | str, sizing: Sizing, stateless_backend: str | None = None,
                      image_cache_bytes: int | None = _KEEP) -> Path:
    """Render an exported repository's config.pbtxt files (and model.py files) again for `sizing`,
    without touching its graphs: the checkpoint's config and the export's dtype are read from the
    repository itself (blip2/1/checkpoint), the stateless backend and the image cache (unless given)
    from its current configs."""
    import json

    from transformers import AutoConfig

    repo = Path(repo)
    assets = assets_dir(repo)
    if not (assets / "config.json").is_file():
        raise FileNotFoundError(f"{repo} is not an exported repository: {assets / 'config.json'} is missing")
    config = AutoConfig.from_pretrained(assets)
    report = assets / "export_report.json"
    dtype = json.loads(report.read_text())["dtype"] if report.is_file() else "fp32"
    float_dtype = "float16" if dtype.startswith("fp16") else "float32"
    current = repo / specs.VISION_ENCODER / "config.pbtxt"
    backend = stateless_backend or (
        "onnxruntime" if current.is_file() and "onnxruntime_onnx" in current.read_text() else "python")
    if image_cache_bytes is _KEEP:
        image_cache_bytes = _current_image_cache(repo / api.PIPELINE / "config.pbtxt")
    return write_repository(repo, config, float_dtype, stateless_backend=backend, sizing=sizing,
                            image_cache_bytes=image_cache_bytes)


def _current_image_cache(config: Path) -> int | None:
    """The image-cache bound a rendered `blip2` config.pbtxt holds (None: off; the default if it has none)."""
    import re

    text = config.read_text() if config.is_file() else ""

    def parameter(key: str) -> str | None:
        m = re.search(r'key: "%s" value: \{ string_value: "([^"]*)" \}' % re.escape(key), text)
        return m.group(1) if m else None

    if parameter(IMAGE_CACHE) == "false":
        return None
    size = parameter(IMAGE_CACHE_BYTES)
    return int(size) if size and size.isdigit() and int(size) > 0 else DEFAULT_IMAGE_CACHE_BYTES
