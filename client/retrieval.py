"""The retrieval calls of the client: `match`, `embed_image`, `embed_text` (a retrieval
checkpoint's models, api.RETRIEVAL_CALLS).

Each call is one request to a non-decoupled model; send many at once with asyncio.gather (the
server batches concurrent requests in its stages). AsyncBlip2Client inherits these methods;
Blip2Client runs them on its loop.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from blip2_triton import api, specs
from blip2_triton.pbtxt import ModelTensor

from .errors import Blip2Error, InvalidArgumentError
from .images import ImageLike, image_bytes

_TRITON = {"bytes": "BYTES"}


@dataclass(frozen=True)
class Match:
    """How well a text matches an image.

    itm_probability: the ITM head's probability that they match (softmax of its logits, "match");
    itc_similarity: cosine similarity of their ITC embeddings, the best of the image's query vectors.
    """

    itm_probability: float
    itc_similarity: float


def _tensor(spec: ModelTensor, value: bytes):
    from tritonclient.grpc import InferInput

    array = np.asarray([[value]], dtype=object)
    t = InferInput(spec.name, list(array.shape), _TRITON[spec.dtype])
    t.set_data_from_numpy(array)
    return t


def _text(text: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}", reason=api.Reason.TEXT)
    return text.encode("utf-8")


class RetrievalCalls:
    """Mixin over the asyncio client's replicas (`_unary`, `timeout`)."""

    async def match(self, image: ImageLike, text: str) -> Match:
        """ITM probability and ITC similarity of one image and one text."""
        out = await self._infer(api.MATCH, [_tensor(api.IMAGE, image_bytes(image)), _tensor(api.RETRIEVAL_TEXT, _text(text))],
                                [api.ITM_PROBABILITY.name, api.ITC_SIMILARITY.name])
        return Match(float(out[api.ITM_PROBABILITY.name].reshape(-1)[0]), float(out[api.ITC_SIMILARITY.name].reshape(-1)[0]))

    async def matches(self, image: ImageLike, texts: Sequence[str]) -> list[Match]:
        """`match` of one image with each text, sent concurrently; results in text order."""
        image = image_bytes(image)  # read once
        tasks = [asyncio.ensure_future(self.match(image, text)) for text in texts]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def embed_image(self, image: ImageLike) -> np.ndarray:
        """The image's normalized projected query embeddings, float32 [Q, D] (BLIP-2: [32, 256])."""
        out = await self._infer(api.EMBED_IMAGE, [_tensor(api.IMAGE, image_bytes(image))], [specs.IMAGE_EMBEDS_PROJ])
        return out[specs.IMAGE_EMBEDS_PROJ][0]

    async def embed_text(self, text: str) -> np.ndarray:
        """The text's normalized projected [CLS] embedding, float32 [D] (BLIP-2: [256])."""
        out = await self._infer(api.EMBED_TEXT, [_tensor(api.RETRIEVAL_TEXT, _text(text))], [specs.TEXT_EMBEDS_PROJ])
        return out[specs.TEXT_EMBEDS_PROJ][0]

    # ---- image search (client/index.py) ------------------------------------------------------
    async def index(self, index, directory, concurrency: int = 8, progress: Callable[[int], None] | None = None):
        """Embed every image under `directory` into `index` (an index.ImageIndex) -> IndexReport."""
        return await index.index(self, directory, concurrency=concurrency, progress=progress)

    async def search_text(self, index, text: str, top_k: int = 5, rerank: int = 0):
        """The `top_k` images of `index` for `text` by ITC, the best `rerank` re-ranked by ITM -> [Hit]."""
        from .index import search_text

        return await search_text(index, self, text, top_k, rerank)

    async def search_image(self, index, image: ImageLike, top_k: int = 5):
        """The `top_k` images of `index` nearest to `image` -> [Hit]."""
        from .index import search_image

        return await search_image(index, self, image, top_k)

    async def _infer(self, model: str, inputs, outputs: list[str]) -> dict[str, np.ndarray]:
        from tritonclient.grpc import InferRequestedOutput

        async def call(client):
            result = await client.infer(model, inputs, outputs=[InferRequestedOutput(n) for n in outputs],
                                        client_timeout=self.timeout)
            return {n: result.as_numpy(n) for n in outputs}

        return await self._unary(model, call)
