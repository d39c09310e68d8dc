"""Request preprocessing: encoded image bytes + prompt -> pixel values + prompt token ids.

Uses the checkpoint's own image processor settings and tokenizer (saved next to the graphs), so the
server sees exactly what `Blip2Processor` would produce in transformers, without importing
transformers: the tokenizer is the `tokenizers` library's own (transformers' fast tokenizers run it),
the image processor numpy and Pillow (image_processing.py). transformers imports torch, which would
make this process, which holds no weights, the size of a PyTorch runtime.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from pathlib import Path

import numpy as np

from blip2_triton.errors import InvalidInput
from blip2_triton.api import Reason

MAX_IMAGE_BYTES = 32 * 2**20
MAX_IMAGE_PIXELS = 50_000_000  # 50 MP: larger images are rejected before they are decoded
MAX_PROMPT_BYTES = 64 * 2**10


_BASE64 = re.compile(rb"^(?:data:[\w/+.-]+;base64,)?([A-Za-z0-9+/=\s]+)$")


def _base64_payload(data: bytes) -> bytes | None:
    """The decoded bytes when `data` is base64 text (optionally a data: URL), else None."""
    match = _BASE64.match(data)
    if not match:
        return None
    try:
        return base64.b64decode(match.group(1), validate=False)
    except (binascii.Error, ValueError):
        return None


def decode_prompt(data: bytes | None) -> str:
    if data is None:
        return ""
    if len(data) > MAX_PROMPT_BYTES:
        # Far beyond any context (64 KiB is ~16k tokens), and refused before it is tokenized.
        raise InvalidInput(f"prompt: {len(data)} bytes, more than the {MAX_PROMPT_BYTES} allowed",
                           Reason.CONTEXT_EXCEEDED)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"prompt: not valid UTF-8 ({e})", Reason.PROMPT) from None


def load_tokenizer(assets: str | Path):
    """The checkpoint's tokenizer as the `tokenizers` library reads it: tokenizer.json holds the
    special tokens the checkpoint's tokenizer adds (its post-processor)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(assets) / "tokenizer.json"))


def encode_prompt(tokenizer, prompt: bytes | None) -> np.ndarray:
    """A request's prompt bytes -> its token ids as the checkpoint's tokenizer adds special tokens
    (OPT: BOS first; T5: </s> last, so "" is [</s>], what the processor gives for text=""); int64
    [S], without the image placeholders; InvalidInput for bytes that are no prompt. Its length is
    checked against the context by the language model. The `preprocess` model runs it, and
    `blip2` itself for an image whose query embeddings it has cached."""
    return np.asarray(tokenizer.encode(decode_prompt(prompt), add_special_tokens=True).ids, dtype=np.int64)


class Preprocessor:
    def __init__(self, assets: str | Path):
        from .image_processing import ImageProcessor

        self.image_processor = ImageProcessor.from_pretrained(assets)
        self.tokenizer = load_tokenizer(assets)

    def decode_image(self, data: bytes):
        """Encoded image file -> RGB PIL image; InvalidInput for anything Pillow cannot read safely.

        Base64 text is accepted too: Triton's HTTP generate endpoint passes JSON strings through
        as they are. The raw bytes are tried first, so a text image format is never mistaken.
        """
        try:
            return self._open_image(data)
        except InvalidInput:
            payload = _base64_payload(data) if data else None
            if not payload:
                raise
            return self._open_image(payload)

    def _open_image(self, data: bytes):
        from PIL import Image

        if not data:
            raise InvalidInput("image: empty; send the bytes of an encoded image file (JPEG, PNG, WebP, ...)",
                               Reason.IMAGE)
        if len(data) > MAX_IMAGE_BYTES:
            raise InvalidInput(f"image: {len(data)} bytes, more than the {MAX_IMAGE_BYTES} allowed", Reason.IMAGE)
        width = height = 0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InvalidInput(
                        f"image: {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} allowed; downscale it first",
                        Reason.IMAGE)
                image.load()
        except InvalidInput:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # Pillow's own guard fires in Image.open, before our size check sees the image.
            raise InvalidInput(
                f"image: {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} allowed; downscale it first"
                if width else f"image: too many pixels, more than the {MAX_IMAGE_PIXELS} allowed; downscale it first",
                Reason.IMAGE) from None
        except Image.UnidentifiedImageError:
            raise InvalidInput(
                f"image: cannot decode: {len(data)} bytes in no format Pillow reads (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)",
                Reason.IMAGE) from None
        except Exception as e:  # Pillow raises many types for corrupt or unknown files
            raise InvalidInput(f"image: cannot decode ({type(e).__name__}: {e})", Reason.IMAGE) from None
        if width < 1 or height < 1:
            raise InvalidInput(f"image: degenerate size {width}x{height}", Reason.IMAGE)
        return image.convert("RGB")

    def pixel_values(self, images) -> np.ndarray:
        """RGB images -> float32 [N, 3, H, W] exactly as the checkpoint's processor makes them."""
        return self.image_processor(images)

    def prompt_ids(self, prompt: str) -> np.ndarray:
        """Prompt -> its token ids (encode_prompt without the bytes checks)."""
        return np.asarray(self.tokenizer.encode(prompt, add_special_tokens=True).ids, dtype=np.int64)

    decode_prompt = staticmethod(decode_prompt)

    def __call__(self, image: bytes, prompt: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One request -> (pixel_values [3, H, W], prompt_ids [S])."""
        result = self.batch([(image, prompt)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def batch(self, items: list[tuple[bytes, bytes | None]]) -> list[tuple[np.ndarray, np.ndarray] | InvalidInput]:
        """Many requests at once: each gets its (pixel_values, prompt_ids) or its own InvalidInput.

        Images that decode are resized and normalised in one processor call.
        """
        results: list = []
        images = []
        for image, prompt in items:
            try:
                ids = encode_prompt(self.tokenizer, prompt)
                images.append(self.decode_image(image))
                results.append(ids)
            except InvalidInput as e:
                results.append(e)
        pixels = iter(self.pixel_values(images) if images else [])
        return [r if isinstance(r, InvalidInput) else (next(pixels), r) for r in results]
