"""How a model repository is sized for its machine: instances, threads, batching, devices.

`Sizing` is what `blip2-triton export` and `blip2-triton configure` (which re-renders an existing
repository's configs without re-exporting the graphs) turn into each model's `config.pbtxt`:

- instances per model (`instance_group.count`);
- onnxruntime intra-op threads per model (parameter `ort_threads`; the stages' and the decoder's
  sessions read it);
- max batch size and dynamic-batching queue delay per stateless model (preprocess, vision_encoder,
  qformer);
- KIND_CPU, or KIND_GPU on the given device ids (the ONNX models then ask onnxruntime for its CUDA
  provider first: parameter `ort_providers`);
- `exclusive_compute`: whether every onnxruntime run takes the repository's compute lock.

`Sizing.for_machine()` derives defaults from the cores and GPUs it finds.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import api, specs

STATELESS = (api.PREPROCESS, specs.VISION_ENCODER, specs.QFORMER)
MODELS = (*STATELESS, api.PIPELINE)
ONNX_MODELS = (specs.VISION_ENCODER, specs.QFORMER, api.PIPELINE)  # the ones that run onnxruntime sessions
MAX_BATCH_SIZE = 16
# No waiting for a batch to fill: on a CPU every stateless stage uses all cores, so requests that
# arrive while one batch runs queue up and form the next batch anyway, while a delay only adds
# latency to a lone request (benchmarks/README.md has the measurements).
QUEUE_DELAY_US = 0
CUDA_PROVIDERS = "CUDAExecutionProvider,CPUExecutionProvider"


class SizingError(ValueError):
    """A sizing option that cannot be rendered (unknown model, a count below 1, ...)."""


@dataclass(frozen=True)
class ModelSizing:
    """One model's share: `threads` None leaves onnxruntime's default (one per physical core, or
    the BLIP2_TRITON_ORT_THREADS environment variable)."""

    instances: int = 1
    threads: int | None = None
    max_batch_size: int = MAX_BATCH_SIZE
    max_queue_delay_us: int = QUEUE_DELAY_US


@dataclass(frozen=True)
class Sizing:
    models: dict[str, ModelSizing] = field(default_factory=lambda: {m: ModelSizing() for m in MODELS})
    gpus: tuple[int, ...] = ()  # empty: KIND_CPU; else KIND_GPU on these device ids
    exclusive_compute: bool = True

    def __post_init__(self):
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown:
            raise SizingError(f"unknown model(s) {unknown}: the repository's models are {list(MODELS)}")
        for name, m in self.models.items():
            for key in ("instances", "max_batch_size"):
                if not _count(getattr(m, key)):
                    raise SizingError(f"{name}: {key} must be an integer >= 1, got {getattr(m, key)!r}")
            if m.threads is not None and not _count(m.threads):
                raise SizingError(f"{name}: threads must be an integer >= 1 (or unset), got {m.threads!r}")
            if isinstance(m.max_queue_delay_us, bool) or not isinstance(m.max_queue_delay_us, int) \
                    or m.max_queue_delay_us < 0:
                raise SizingError(f"{name}: the queue delay must be an integer >= 0 µs, got {m.max_queue_delay_us!r}")
            if name == api.PIPELINE and (m.max_batch_size, m.max_queue_delay_us) != (MAX_BATCH_SIZE, QUEUE_DELAY_US):
                raise SizingError(f"{api.PIPELINE}: max batch size and queue delay are for the stateless models "
                                  f"{list(STATELESS)} (the engine batches decoding itself)")
            if name == api.PREPROCESS and m.threads is not None:
                raise SizingError(f"{api.PREPROCESS} runs no onnxruntime session: threads do not apply")
        if any(not isinstance(g, int) or isinstance(g, bool) or g < 0 for g in self.gpus):
            raise SizingError(f"GPU device ids must be integers >= 0, got {list(self.gpus)}")
        for m in MODELS:
            self.models.setdefault(m, ModelSizing())

    def model(self, name: str) -> ModelSizing:
        return self.models[name]

    @property
    def kind(self) -> str:
        return "KIND_GPU" if self.gpus else "KIND_CPU"

    def parameters(self, name: str) -> dict[str, str]:
        """The sizing's model parameters in config.pbtxt (read back by serving/triton_io.ModelArgs)."""
        params = {}
        if name in ONNX_MODELS:
            params[EXCLUSIVE_COMPUTE] = "true" if self.exclusive_compute else "false"
            if self.models[name].threads is not None:
                params[ORT_THREADS] = str(self.models[name].threads)
            if self.gpus:
                params[ORT_PROVIDERS] = CUDA_PROVIDERS
        return params

    def with_models(self, **changes: dict) -> "Sizing":
        """A copy with some fields of some models changed: with_models(vision_encoder={"instances": 2})."""
        unknown = sorted(set(changes) - set(MODELS))
        if unknown:
            raise SizingError(f"unknown model(s) {unknown}: the repository's models are {list(MODELS)}")
        models = {name: replace(self.models[name], **changes.get(name, {})) for name in MODELS}
        return replace(self, models=models)

    @classmethod
    def for_machine(cls, cores: int | None = None, gpus: tuple[int, ...] | None = None) -> "Sizing":
        """Defaults for this machine (or the given cores and GPU ids).

        CPU: one instance of each ONNX model, every run taking its turn on all cores
        (exclusive_compute), as measured best on small hosts (README: "Taking turns on the CPU");
        preprocess (single-threaded Python: image decoding, tokenizing) gets one instance per 8 cores,
        up to 4, so it keeps up with wider ONNX runs. GPU: KIND_GPU on every GPU found, runs overlap
        (no compute lock), and preprocess as on the CPU.
        """
        cores = cores or available_cores()
        gpus = tuple(visible_gpus() if gpus is None else gpus)
        sizing = cls(gpus=gpus, exclusive_compute=not gpus)
        return sizing.with_models(preprocess={"instances": max(1, min(4, cores // 8))})


# Model parameters the sizing writes (the serving code reads them by these names).
EXCLUSIVE_COMPUTE = "exclusive_compute"
ORT_THREADS = "ort_threads"
ORT_PROVIDERS = "ort_providers"


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; a container's cpuset included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> tuple[int, ...]:
    """NVIDIA GPUs the driver lists (/proc/driver/nvidia/gpus), limited by CUDA_VISIBLE_DEVICES."""
    found = Path("/proc/driver/nvidia/gpus")
    count = len(list(found.iterdir())) if found.is_dir() else 0
    ids = tuple(range(count))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        ids = tuple(int(v) for v in wanted if v.isdigit() and int(v) < count)
    return ids


# ---- command-line options (export and configure share them) ----------------------------------------
def add_arguments(p) -> None:
    """Sizing flags on an argparse parser; `from_arguments(args)` reads them back."""
    g = p.add_argument_group("sizing", "defaults derived from this machine's cores and GPUs "
                             "(MODEL is one of " + ", ".join(MODELS) + ")")
    g.add_argument("--instances", action="append", metavar="MODEL=N", default=[], help="instances of a model")
    g.add_argument("--threads", action="append", metavar="MODEL=N", default=[],
                   help="onnxruntime intra-op threads of a model's sessions")
    g.add_argument("--max-batch-size", action="append", metavar="MODEL=N", default=[],
                   help="max batch size of a stateless model")
    g.add_argument("--queue-delay-us", action="append", metavar="MODEL=N", default=[],
                   help="dynamic batching queue delay of a stateless model (microseconds)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--gpus", metavar="IDS", help="KIND_GPU on these device ids, comma-separated (e.g. 0,1)")
    where.add_argument("--cpu", action="store_true", help="KIND_CPU even where GPUs are present")
    g.add_argument("--exclusive-compute", action=argparse.BooleanOptionalAction, default=None,
                   help="every onnxruntime run takes the repository's compute lock (default: on a CPU host only)")


def from_arguments(args) -> Sizing:
    """The Sizing the flags ask for, on top of Sizing.for_machine()."""
    gpus = () if args.cpu else (tuple(_ints(args.gpus, "--gpus")) if args.gpus else None)
    sizing = Sizing.for_machine(gpus=gpus)
    changes: dict[str, dict] = {}
    for flag, key in (("instances", "instances"), ("threads", "threads"), ("max_batch_size", "max_batch_size"),
                      ("queue_delay_us", "max_queue_delay_us")):
        for item in getattr(args, flag):
            model, sep, value = item.partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise SizingError(f"--{flag.replace('_', '-')} takes MODEL=N, got {item!r}")
            changes.setdefault(model.strip(), {})[key] = int(value)
    sizing = sizing.with_models(**changes)
    if args.exclusive_compute is not None:
        sizing = replace(sizing, exclusive_compute=args.exclusive_compute)
    return Sizing(dict(sizing.models), sizing.gpus, sizing.exclusive_compute)  # validated


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SizingError(f"{flag} takes comma-separated device ids, got {text!r}") from None
