"""Rendering Triton `config.pbtxt` text from typed model configs.

Every value comes from a dataclass field; a missing one fails here, at generation time, so no
placeholder can survive into a served config.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .specs import TensorSpec

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
class Tensor:
    """A Triton input/output: dims exclude the batch dimension when the model batches."""

    name: str
    dtype: str  # a key of TRITON_DTYPES
    dims: tuple[int, ...]
    optional: bool = False

    @classmethod
    def from_spec(cls, spec: TensorSpec, batched: bool = True, optional: bool = False) -> "Tensor":
        dims = spec.dims[1:] if batched else spec.dims
        return cls(spec.name, spec.dtype, tuple(-1 if isinstance(d, str) else int(d) for d in dims), optional)

    @property
    def np_dtype(self):
        return np.object_ if self.dtype == "bytes" else np.dtype(self.dtype)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    max_batch_size: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    backend: str | None = "python"
    platform: str | None = None
    dynamic_batching: bool = False
    max_queue_delay_us: int = 0
    decoupled: bool = False
    instance_count: int = 1
    parameters: dict[str, str] = field(default_factory=dict)
    default_model_filename: str | None = None


class ConfigError(ValueError):
    """A model config cannot be rendered (a missing or contradictory value)."""


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor(t: Tensor, indent: str) -> str:
    if t.dtype not in TRITON_DTYPES:
        raise ConfigError(f"{t.name}: no Triton type for dtype {t.dtype!r}")
    if not t.dims or any(not isinstance(d, int) for d in t.dims):
        raise ConfigError(f"{t.name}: dims must be a non-empty list of ints, got {t.dims!r}")
    lines = [f"name: {_q(t.name)}", f"data_type: {TRITON_DTYPES[t.dtype]}", f"dims: [ {', '.join(map(str, t.dims))} ]"]
    if t.optional:
        lines.append("optional: true")
    inner = indent + "  "
    return indent + "{\n" + "".join(f"{inner}{line}\n" for line in lines) + indent + "}"


def render(cfg: ModelConfig) -> str:
    for attr in ("name", "max_batch_size", "inputs", "outputs"):
        if getattr(cfg, attr) in (None, ""):
            raise ConfigError(f"model config {cfg.name!r}: missing {attr}")
    if (cfg.backend is None) == (cfg.platform is None):
        raise ConfigError(f"model config {cfg.name!r}: set exactly one of backend / platform")
    parts = [f"name: {_q(cfg.name)}"]
    parts.append(f"backend: {_q(cfg.backend)}" if cfg.backend else f"platform: {_q(cfg.platform)}")
    parts.append(f"max_batch_size: {cfg.max_batch_size}")
    if cfg.default_model_filename:
        parts.append(f"default_model_filename: {_q(cfg.default_model_filename)}")
    parts.append("input [\n" + ",\n".join(_tensor(t, "  ") for t in cfg.inputs) + "\n]")
    parts.append("output [\n" + ",\n".join(_tensor(t, "  ") for t in cfg.outputs) + "\n]")
    if cfg.decoupled:
        parts.append("model_transaction_policy { decoupled: true }")
    if cfg.dynamic_batching:
        parts.append(f"dynamic_batching {{ max_queue_delay_microseconds: {cfg.max_queue_delay_us} }}")
    parts.append(f"instance_group [ {{ count: {cfg.instance_count} kind: KIND_CPU }} ]")
    for key, value in cfg.parameters.items():
        if value is None:
            raise ConfigError(f"model config {cfg.name!r}: parameter {key!r} has no value")
        parts.append(f"parameters {{ key: {_q(key)} value: {{ string_value: {_q(str(value))} }} }}")
    return "\n".join(parts) + "\n"
