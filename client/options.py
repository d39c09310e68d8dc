"""Generation controls as the client sends them: names as in transformers, types checked early.

Ranges and combinations are checked by the server (which knows the checkpoint's defaults and
context length); the client only refuses what cannot even be encoded.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from blip2_triton.api import CONTROLS, Reason

from .errors import InvalidArgumentError

# The Python type of each control dtype (the CLI derives its flags from this too).
PYTHON_TYPES = {"int32": int, "int64": int, "float32": float, "bool": bool}


@dataclass(frozen=True)
class GenerationOptions:
    values: tuple[tuple[str, object], ...] = ()

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "GenerationOptions":
        known = {t.name: t for t in CONTROLS}
        values = []
        for name, value in kwargs.items():
            if value is None:
                continue
            if name not in known:
                raise InvalidArgumentError(f"unknown generation control {name!r}; known: {sorted(known)}",
                                           reason=Reason.CONTROL)
            dtype = known[name].dtype
            kind = PYTHON_TYPES[dtype]
            is_bool = isinstance(value, (bool, np.bool_))
            if kind is bool and not is_bool:
                raise InvalidArgumentError(f"{name} must be true or false, got {value!r}", reason=Reason.CONTROL)
            if kind is int and (is_bool or not isinstance(value, numbers.Integral)):
                raise InvalidArgumentError(f"{name} must be an integer, got {value!r}", reason=Reason.CONTROL)
            if kind is int and not np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
                raise InvalidArgumentError(f"{name} must fit {dtype}, got {value}", reason=Reason.CONTROL)
            if kind is float and (is_bool or not isinstance(value, numbers.Real)):
                raise InvalidArgumentError(f"{name} must be a number, got {value!r}", reason=Reason.CONTROL)
            values.append((name, kind(value)))
        return cls(tuple(values))

    def items(self):
        return iter(self.values)
