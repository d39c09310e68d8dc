"""The whole served pipeline in one process, over an exported model repository, with no Triton.

Same code path as the server's models (preprocess -> vision encoder -> Q-Former -> generator ->
detokenize), used by the parity tests and as the "in-process" baseline of the benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blip2_triton import repository, specs

from .detokenize import Detokenizer
from .generator import GeneratorService
from .onnx_graph import OnnxGraph
from .preprocess import Preprocessor


@dataclass
class Generation:
    text: str
    token_ids: list[int]


class LocalPipeline:
    def __init__(self, repo: str | Path, threads: int | None = None):
        repo = Path(repo)
        assets = repository.assets_dir(repo)
        self.preprocessor = Preprocessor(assets)
        self.vision = OnnxGraph(repository.graph_path(repo, specs.VISION_ENCODER), threads)
        self.qformer = OnnxGraph(repository.graph_path(repo, specs.QFORMER), threads)
        self.generator = GeneratorService(assets, repository.graph_path(repo, specs.LLM_DECODER), threads)
        self.detokenizer = Detokenizer(self.preprocessor.tokenizer)

    def query_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, H, W] -> [N, Q, E] through the vision encoder and Q-Former graphs."""
        image_embeds = self.vision(**{specs.PIXEL_VALUES: pixel_values})[specs.IMAGE_EMBEDS]
        return self.qformer(**{specs.IMAGE_EMBEDS: image_embeds})[specs.QUERY_EMBEDS]

    def __call__(self, image: bytes, prompt: str = "", **controls: Any) -> Generation:
        pixels, prompt_ids = self.preprocessor(image, prompt.encode("utf-8"))
        query = self.query_embeds(pixels[None])[0]
        request = self.generator.request(query, prompt_ids, controls)
        tokens = [int(t) for t in self.generator.engine.generate(request)]
        return Generation(self.detokenizer.piece(tokens, len(tokens), final=True), tokens)
