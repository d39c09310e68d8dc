"""Any image a user holds -> the encoded file bytes the server's `image` input takes."""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np

ImageLike = Union[str, os.PathLike, bytes, bytearray, "PIL.Image.Image", np.ndarray]  # noqa: F821


def image_bytes(image: ImageLike) -> bytes:
    """Path or encoded bytes are sent as they are; PIL images and HxWxC uint8 arrays as PNG."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(f"numpy images must be uint8 HxW or HxWxC arrays, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"unsupported image type {type(image).__name__}: use a path, bytes, a PIL image or a numpy array")
