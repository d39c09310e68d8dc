"""Any image a user holds -> the encoded file bytes the server's `image` input takes."""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np

from blip2_triton.api import Reason

from .errors import InvalidArgumentError

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, "PIL.Image.Image", np.ndarray]  # noqa: F821


def image_bytes(image: ImageLike) -> bytes:
    """Path or encoded bytes are sent as they are (the server decodes and validates them);
    PIL images and uint8 arrays (HxW, HxWx1, HxWx3 RGB or HxWx4 RGBA) are sent as PNG.

    Raises InvalidArgumentError for an unreadable path or an image it cannot encode.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                return f.read()
        except OSError as e:
            raise InvalidArgumentError(f"image: cannot read {os.fspath(image)!r}: {e.strerror or e}",
                                       reason=Reason.IMAGE) from None
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = _from_array(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise InvalidArgumentError(
        f"image: unsupported type {type(image).__name__}; use a path, bytes, a PIL image or a uint8 numpy array",
        reason=Reason.IMAGE)


def _from_array(array: np.ndarray):
    from PIL import Image

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InvalidArgumentError(
            f"image: numpy images must be uint8 HxW, HxWx3 or HxWx4 arrays, got {array.dtype} {list(array.shape)}",
            reason=Reason.IMAGE)
    return Image.fromarray(np.ascontiguousarray(array))
