"""Rendering Triton `config.pbtxt` text from typed model configs.

Every value comes from a dataclass field; a missing one fails here, at generation time, so no
placeholder can survive into a served config.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from .specs import TensorSpec


class ConfigError(ValueError):
    """A model config cannot be rendered (a missing or contradictory value)."""


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "bytes": "TYPE_STRING",
}


@dataclass(frozen=True)
class ModelTensor:
    """A Triton input/output: dims exclude the batch dimension when the model batches."""

    name: str
    dtype: str  # a key of TRITON_DTYPES
    dims: tuple[int, ...]
    optional: bool = False

    @classmethod
    def from_spec(cls, spec: TensorSpec, batched: bool = True, optional: bool = False) -> "ModelTensor":
        """Symbolic axes become -1; any other dim must be an int (ConfigError naming the tensor)."""
        dims = spec.dims[1:] if batched else spec.dims
        bad = [d for d in dims if not isinstance(d, str) and not _is_int(d)]
        if bad:
            raise ConfigError(f"tensor {spec.name!r}: dims must be ints or axis names, got {tuple(spec.dims)!r}")
        return cls(spec.name, spec.dtype, tuple(-1 if isinstance(d, str) else int(d) for d in dims), optional)

    @property
    def np_dtype(self):
        return np.object_ if self.dtype == "bytes" else np.dtype(self.dtype)


@dataclass(frozen=True)
class EnsembleStep:
    """One step of an ensemble: the model it runs and how its tensors map to the ensemble's
    (model tensor name -> ensemble tensor name, as Triton's input_map / output_map)."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    max_batch_size: int
    inputs: tuple[ModelTensor, ...]
    outputs: tuple[ModelTensor, ...]
    backend: str | None = "python"
    platform: str | None = None
    dynamic_batching: bool = False
    max_queue_delay_us: int = 0
    max_queue_size: int = 0  # requests the dynamic batcher's queue holds; 0: no bound (Triton's default)
    decoupled: bool = False
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"
    gpus: tuple[int, ...] = ()  # device ids, with KIND_GPU
    parameters: dict[str, str] = field(default_factory=dict)
    default_model_filename: str | None = None
    # platform "ensemble" only: its steps, in the order Triton may start them.
    steps: tuple[EnsembleStep, ...] = ()




def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor(t: ModelTensor, indent: str) -> str:
    if not isinstance(t, ModelTensor):
        raise ConfigError(f"expected a ModelTensor, got {t!r}")
    if not isinstance(t.name, str) or not t.name:
        raise ConfigError(f"tensor {t!r}: missing name")
    if t.dtype not in TRITON_DTYPES:
        raise ConfigError(f"tensor {t.name!r}: no Triton type for dtype {t.dtype!r}")
    if not isinstance(t.dims, tuple) or not t.dims or not all(_is_int(d) and (d > 0 or d == -1) for d in t.dims):
        raise ConfigError(f"tensor {t.name!r}: dims must be a non-empty tuple of positive ints or -1, got {t.dims!r}")
    if not isinstance(t.optional, bool):
        raise ConfigError(f"tensor {t.name!r}: optional must be a bool, got {t.optional!r}")
    lines = [f"name: {_q(t.name)}", f"data_type: {TRITON_DTYPES[t.dtype]}", f"dims: [ {', '.join(map(str, t.dims))} ]"]
    if t.optional:
        lines.append("optional: true")
    inner = indent + "  "
    return indent + "{\n" + "".join(f"{inner}{line}\n" for line in lines) + indent + "}"


ENSEMBLE = "ensemble"


def _step(step: EnsembleStep) -> str:
    lines = [f"model_name: {_q(step.model)}", "model_version: -1"]
    lines += [f"input_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in step.inputs.items()]
    lines += [f"output_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in step.outputs.items()]
    return "    {\n" + "".join(f"      {line}\n" for line in lines) + "    }"


# The only fields that may be None: a model has a backend or a platform, and maybe a file name.
_MAY_BE_NONE = {"backend", "platform", "default_model_filename"}


def _check(cfg: ModelConfig) -> None:
    """Every value present and of its type, so nothing like `None` or `[]` reaches a config file."""
    label = f"model config {cfg.name!r}"
    for f in fields(cfg):
        if getattr(cfg, f.name) is None and f.name not in _MAY_BE_NONE:
            raise ConfigError(f"{label}: missing {f.name}")
    if not isinstance(cfg.name, str) or not cfg.name:
        raise ConfigError(f"{label}: missing name")
    for key in ("max_batch_size", "max_queue_delay_us", "max_queue_size", "instance_count"):
        value = getattr(cfg, key)
        if not _is_int(value) or value < (1 if key == "instance_count" else 0):
            raise ConfigError(f"{label}: {key} must be an int >= {1 if key == 'instance_count' else 0}, got {value!r}")
    for key in ("dynamic_batching", "decoupled"):
        if not isinstance(getattr(cfg, key), bool):
            raise ConfigError(f"{label}: {key} must be a bool, got {getattr(cfg, key)!r}")
    for key in ("inputs", "outputs"):
        if not isinstance(getattr(cfg, key), tuple) or not getattr(cfg, key):
            raise ConfigError(f"{label}: missing {key} (a non-empty tuple of Tensors), got {getattr(cfg, key)!r}")
    if (cfg.backend is None) == (cfg.platform is None):
        raise ConfigError(f"{label}: set exactly one of backend / platform")
    for key in ("backend", "platform", "default_model_filename"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{label}: {key} must be a non-empty string or None, got {value!r}")
    ensemble = cfg.platform == ENSEMBLE
    if ensemble != bool(cfg.steps):
        raise ConfigError(f"{label}: steps go with platform {ENSEMBLE!r} and it needs them, got {len(cfg.steps)} steps"
                          f" for platform {cfg.platform!r}")
    if ensemble and (cfg.dynamic_batching or cfg.decoupled or cfg.parameters or cfg.gpus
                     or cfg.instance_kind != "KIND_CPU" or cfg.instance_count != 1):
        raise ConfigError(f"{label}: an ensemble has no dynamic_batching, decoupled, parameters or instances of its own")
    for step in cfg.steps:
        if not isinstance(step, EnsembleStep) or not step.model or not step.inputs or not step.outputs:
            raise ConfigError(f"{label}: a step needs a model, inputs and outputs, got {step!r}")
        for key, value in (*step.inputs.items(), *step.outputs.items()):
            if not (isinstance(key, str) and key and isinstance(value, str) and value):
                raise ConfigError(f"{label}: step {step.model!r} maps {key!r} to {value!r}: both must be tensor names")
    if not isinstance(cfg.parameters, dict):
        raise ConfigError(f"{label}: parameters must be a dict, got {cfg.parameters!r}")
    for key, value in cfg.parameters.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{label}: parameter key {key!r} is not a non-empty string")
        if value is None:
            raise ConfigError(f"{label}: parameter {key!r} has no value")


def render(cfg: ModelConfig) -> str:
    """config.pbtxt text; ConfigError naming the field for any missing or ill-typed value."""
    _check(cfg)
    parts = [f"name: {_q(cfg.name)}"]
    parts.append(f"backend: {_q(cfg.backend)}" if cfg.backend else f"platform: {_q(cfg.platform)}")
    parts.append(f"max_batch_size: {cfg.max_batch_size}")
    if cfg.default_model_filename:
        parts.append(f"default_model_filename: {_q(cfg.default_model_filename)}")
    parts.append("input [\n" + ",\n".join(_tensor(t, "  ") for t in cfg.inputs) + "\n]")
    parts.append("output [\n" + ",\n".join(_tensor(t, "  ") for t in cfg.outputs) + "\n]")
    if cfg.decoupled:
        parts.append("model_transaction_policy { decoupled: true }")
    if cfg.max_queue_size and not cfg.dynamic_batching:
        raise ConfigError(f"model config {cfg.name!r}: max_queue_size needs dynamic_batching")
    if cfg.dynamic_batching:
        policy = (f" default_queue_policy {{ max_queue_size: {cfg.max_queue_size} }}" if cfg.max_queue_size else "")
        parts.append(f"dynamic_batching {{ max_queue_delay_microseconds: {cfg.max_queue_delay_us}{policy} }}")
    if cfg.instance_kind not in ("KIND_CPU", "KIND_GPU"):
        raise ConfigError(f"model config {cfg.name!r}: instance_kind must be KIND_CPU or KIND_GPU, got {cfg.instance_kind!r}")
    if not isinstance(cfg.gpus, tuple) or not all(_is_int(g) and g >= 0 for g in cfg.gpus) \
            or bool(cfg.gpus) != (cfg.instance_kind == "KIND_GPU"):
        raise ConfigError(f"model config {cfg.name!r}: gpus must list device ids exactly with KIND_GPU, got {cfg.gpus!r}")
    gpus = f" gpus: [ {', '.join(map(str, cfg.gpus))} ]" if cfg.gpus else ""
    if cfg.steps:
        parts.append("ensemble_scheduling {\n  step [\n" + ",\n".join(_step(s) for s in cfg.steps) + "\n  ]\n}")
    else:  # an ensemble runs no instances of its own
        parts.append(f"instance_group [ {{ count: {cfg.instance_count} kind: {cfg.instance_kind}{gpus} }} ]")
    for key, value in cfg.parameters.items():
        parts.append(f"parameters {{ key: {_q(key)} value: {{ string_value: {_q(str(value))} }} }}")
    return "\n".join(parts) + "\n"
