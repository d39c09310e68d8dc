"""What the benchmark runs: models (built and exported once, cached), request workloads, images.

Every request of a workload generates exactly `max_new_tokens` tokens (min_new_tokens equals it),
so latencies of different systems and of different images compare like for like.
"""
from __future__ import annotations

# Imports inside functions keep the exporter (torch) out of a run that reuses exported models.

import hashlib
import io
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("blip2_triton.bench")

IMAGE_SIZE = (640, 480)  # a typical photo: preprocessing pays for decoding and resizing it


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: str
    max_new_tokens: int

    @property
    def controls(self) -> dict[str, int]:
        """Generation controls, named as in transformers' generate(); greedy, fixed length."""
        return {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.max_new_tokens}


def workloads(caption_tokens: int = 30, vqa_tokens: int = 10) -> list[Workload]:
    return [
        Workload("caption", "", caption_tokens),
        Workload("vqa", "Question: what color is the square? Answer:", vqa_tokens),
    ]


def images(count: int, size: tuple[int, int] = IMAGE_SIZE) -> list[bytes]:
    """`count` JPEG files made from the bundled sample scenes (deterministic), cycled if needed."""
    from PIL import Image

    from blip2_triton.toy.embedded import samples

    scenes = [s.path for s in samples()]
    out = []
    for i in range(count):
        with Image.open(scenes[i % len(scenes)]) as scene:
            picture = scene.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        if i >= len(scenes):  # a different picture per index, not just the same file again
            picture = picture.rotate(90 * (i // len(scenes)), expand=False)
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@dataclass
class PreparedModel:
    """A checkpoint and its exported, validated Triton model repository."""

    name: str
    checkpoint: Path
    repository: Path
    source: str  # "preset base-opt (random weights, seed 0)" or the trained checkpoint's path
    export_seconds: float | None
    export_max_abs_diff: dict
    int8_repository: Path | None = None  # the same checkpoint exported with --quantize int8

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _code_fingerprint() -> str:
    """Hash of what shapes an exported repository: the exporter, specs and model.py sources."""
    import blip2_triton
    from blip2_triton import export as export_pkg
    from blip2_triton.model_repository import SOURCE_DIR

    files = sorted(Path(export_pkg.__file__).parent.glob("*.py")) + sorted(SOURCE_DIR.rglob("*.py"))
    files += [Path(blip2_triton.__file__).parent / name for name in ("specs.py", "repository.py", "pbtxt.py", "api.py")]
    digest = hashlib.sha256()
    for f in files:
        if f.exists():
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def prepare_model(spec: str, workdir: Path, rebuild: bool = False, seed: int = 0, int8: bool = False) -> PreparedModel:
    """`spec` is a preset name (toy.presets.ALL_PRESETS) or a checkpoint directory.

    Builds (presets only) and exports into `workdir/<name>/` (with `int8`, also an int8-weight
    export), reusing both while the preset, the checkpoint file and the export code are unchanged.
    """
    from blip2_triton import repository
    from blip2_triton.export.exporter import export_checkpoint
    from blip2_triton.toy.presets import ALL_PRESETS, build_tiny_checkpoint

    presets = ALL_PRESETS
    if spec in presets:
        name = spec
        home = workdir / name
        checkpoint = home / "checkpoint"
        source = f"preset {spec} (random weights, seed {seed})"
        key = {"preset": repr(presets[spec]), "seed": seed}
    else:
        checkpoint = Path(spec).resolve()
        if not (checkpoint / "config.json").exists():
            raise SystemExit(f"--model {spec}: neither a preset ({', '.join(sorted(presets))}) nor a checkpoint directory")
        name = checkpoint.name
        home = workdir / name
        source = str(checkpoint)
        weights = checkpoint / "model.safetensors"
        key = {"checkpoint": str(checkpoint), "size": weights.stat().st_size, "mtime": weights.stat().st_mtime}
    key["code"] = _code_fingerprint()
    key["int8"] = int8
    repo = home / "repository"
    repo_int8 = home / "repository-int8"
    stamp = home / "stamp.json"
    fresh = not rebuild and stamp.exists() and json.loads(stamp.read_text()) == key
    if not fresh:
        if home.exists():
            shutil.rmtree(home)
        home.mkdir(parents=True)
        if spec in presets:
            log.info("building checkpoint %s", spec)
            build_tiny_checkpoint(checkpoint, spec, seed=seed)
        log.info("exporting %s -> %s", checkpoint, repo)
        export_checkpoint(checkpoint, repo, progress=False)
        if int8:
            log.info("exporting %s -> %s (int8)", checkpoint, repo_int8)
            export_checkpoint(checkpoint, repo_int8, quantize="int8", progress=False)
        stamp.write_text(json.dumps(key))
    assets = repository.assets_dir(repo)
    if not assets.is_dir():  # a retrieval checkpoint's export keeps its assets beside `match`
        assets = repository.retrieval_assets_dir(repo)
    report = json.loads((assets / "export_report.json").read_text())
    return PreparedModel(name, checkpoint, repo, source, report.get("seconds"), report.get("max_abs_diff", {}),
                         repo_int8 if int8 else None)


def configure_image_cache(model: PreparedModel, image_cache_bytes: int | None) -> None:
    """Rewrite the served configs of `model`'s repository with this image-cache setting (None: off).

    The latency and throughput rows measure requests that run every stage, as clients with a new
    image each see them; they send a few pictures again and again, which the cache would answer.
    """
    from transformers import AutoConfig

    from blip2_triton.export.repository_writer import write_repository

    write_repository(model.repository, AutoConfig.from_pretrained(model.checkpoint), image_cache_bytes=image_cache_bytes)
