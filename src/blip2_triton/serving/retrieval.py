"""Image-text retrieval calls over a retrieval checkpoint's graphs: what `embed_image`,
`embed_text` and `match` serve.

    embed_image: image bytes -> preprocess -> vision encoder -> image_features -> [Q, D]
    embed_text:  text -> Q-Former tokenizer -> text_features -> [D]
    match:       both, plus itm(image_embeds, text) -> (ITM probability, ITC similarity)

Every vector is of unit length, so ITC similarity is a dot product: the max over the image's
query vectors, as Blip2ForImageTextRetrieval computes `logits_per_image`. The stages are pluggable
as in service.py: BLS calls to the dynamically batched stage models inside Triton
(triton_io.RetrievalBlsStages), or the same graphs in this process (LocalRetrievalStages).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from blip2_triton import api, repository, specs
from blip2_triton.api import Reason
from blip2_triton.errors import InvalidInput

from .onnx_graph import OnnxGraph
from .preprocess import Preprocessor

MAX_TEXT_BYTES = 64 * 2**10


class RetrievalStages(Protocol):
    def pixel_values(self, image: bytes) -> np.ndarray:
        """Encoded image -> pixel values [3, H, W]; InvalidInput if it is not a readable image."""

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        """[3, H, W] -> the vision encoder's output [P, Dv]."""

    def image_features(self, image_embeds: np.ndarray) -> np.ndarray:
        """[P, Dv] -> unit query vectors [Q, D]."""

    def text_features(self, input_ids: np.ndarray) -> np.ndarray:
        """Token ids [S] -> a unit vector [D]."""

    def itm_logits(self, image_embeds: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
        """[P, Dv], [S] -> the ITM logits [2] (no match, match)."""


class TextTokenizer:
    """Text -> the Q-Former tokenizer's ids ([CLS] text [SEP]); InvalidInput (reason TEXT) for an
    empty text, one that is not UTF-8, or one with more tokens than the Q-Former has positions."""

    def __init__(self, assets: str | Path):
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(assets)
        limits = [AutoConfig.from_pretrained(assets).qformer_config.max_position_embeddings]
        if 0 < getattr(self.tokenizer, "model_max_length", 0) < 10**6:  # "no limit" is a huge number
            limits.append(self.tokenizer.model_max_length)
        self.max_tokens = min(limits)

    def __call__(self, text: bytes | str | None) -> np.ndarray:
        if text is None:
            raise InvalidInput("text: required input is missing", Reason.INPUT)
        if isinstance(text, bytes):
            if len(text) > MAX_TEXT_BYTES:
                raise InvalidInput(f"text: {len(text)} bytes, more than the {MAX_TEXT_BYTES} allowed", Reason.TEXT)
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(f"text: not valid UTF-8 ({e})", Reason.TEXT) from None
        if not text.strip():
            raise InvalidInput("text: empty; send the words to embed or match", Reason.TEXT)
        ids = np.asarray(self.tokenizer(text, add_special_tokens=True)["input_ids"], dtype=np.int64)
        if len(ids) > self.max_tokens:
            raise InvalidInput(f"text: {len(ids)} tokens, more than the {self.max_tokens} the model's text encoder "
                               f"takes; shorten it", Reason.TEXT)
        return ids


@dataclass(frozen=True)
class Match:
    itm_probability: float  # softmax of the ITM logits, the "match" class
    itc_similarity: float  # max over the image's query vectors of their dot product with the text's


def itm_probability(logits: np.ndarray) -> float:
    """Softmax of the ITM logits [2], the probability of "match" (index 1)."""
    logits = np.asarray(logits, dtype=np.float64)
    e = np.exp(logits - logits.max())
    return float(e[1] / e.sum())


def itc_similarity(image_features: np.ndarray, text_features: np.ndarray) -> float:
    """[Q, D] query vectors, [D] text vector -> the best query's cosine similarity."""
    return float(np.max(image_features.astype(np.float32) @ text_features.astype(np.float32)))


class RetrievalService:
    """The three calls; texts are checked before any image is decoded or any graph runs."""

    def __init__(self, assets: str | Path, stages: RetrievalStages, tokenizer: TextTokenizer | None = None):
        self.stages = stages
        self.tokenize = tokenizer or TextTokenizer(assets)

    def embed_image(self, image: bytes) -> np.ndarray:
        """-> image_embeds_proj [Q, D] float32."""
        embeds = self.stages.image_embeds(self.stages.pixel_values(image))
        return self.stages.image_features(embeds).astype(np.float32)

    def embed_text(self, text: bytes | str) -> np.ndarray:
        """-> text_embeds_proj [D] float32."""
        return self.stages.text_features(self.tokenize(text)).astype(np.float32)

    def match(self, image: bytes, text: bytes | str) -> Match:
        ids = self.tokenize(text)
        embeds = self.stages.image_embeds(self.stages.pixel_values(image))
        features = self.stages.image_features(embeds)
        return Match(itm_probability(self.stages.itm_logits(embeds, ids)),
                     itc_similarity(features, self.stages.text_features(ids)))

    def call(self, name: str, image: bytes | None = None, text: bytes | None = None) -> dict[str, np.ndarray]:
        """One public call by its model name (api.RETRIEVAL_CALLS) -> its outputs, by tensor name."""
        if name == api.EMBED_IMAGE:
            return {specs.IMAGE_EMBEDS_PROJ: self.embed_image(_required(image, api.IMAGE.name))}
        if name == api.EMBED_TEXT:
            return {specs.TEXT_EMBEDS_PROJ: self.embed_text(_required(text, api.RETRIEVAL_TEXT.name))}
        if name == api.MATCH:
            result = self.match(_required(image, api.IMAGE.name), _required(text, api.RETRIEVAL_TEXT.name))
            return {api.ITM_PROBABILITY.name: np.asarray([result.itm_probability], np.float32),
                    api.ITC_SIMILARITY.name: np.asarray([result.itc_similarity], np.float32)}
        raise ValueError(f"unknown retrieval call {name!r}; expected one of {api.RETRIEVAL_CALLS}")


def _required(value, name: str):
    if value is None:
        raise InvalidInput(f"{name}: required input is missing", Reason.INPUT)
    return value


def text_inputs(input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """One text's ids [S] as a graph's batch of one: input_ids and attention_mask [1, S]."""
    ids = np.asarray(input_ids, np.int64)[None]
    return {specs.INPUT_IDS: ids, specs.ATTENTION_MASK: np.ones_like(ids)}


class LocalRetrievalStages:
    """The retrieval stages in this process: the same preprocessing and graphs the Triton models run."""

    def __init__(self, repo: str | Path, threads: int | None = None):
        self.preprocessor = Preprocessor(repository.retrieval_assets_dir(repo))
        graph = {name: OnnxGraph(repository.graph_path(repo, name), threads) for name in repository.RETRIEVAL_GRAPHS}
        self.vision, self.image, self.text, self.itm = (graph[n] for n in repository.RETRIEVAL_GRAPHS)

    def pixel_values(self, image: bytes) -> np.ndarray:
        return self.preprocessor(image)[0]

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision(**{specs.PIXEL_VALUES: pixel_values[None]})[specs.IMAGE_EMBEDS][0]

    def image_features(self, image_embeds: np.ndarray) -> np.ndarray:
        return self.image(**{specs.IMAGE_EMBEDS: image_embeds[None]})[specs.IMAGE_EMBEDS_PROJ][0]

    def text_features(self, input_ids: np.ndarray) -> np.ndarray:
        return self.text(**text_inputs(input_ids))[specs.TEXT_EMBEDS_PROJ][0]

    def itm_logits(self, image_embeds: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
        return self.itm(**{specs.IMAGE_EMBEDS: image_embeds[None], **text_inputs(input_ids)})[specs.ITM_LOGITS][0]
