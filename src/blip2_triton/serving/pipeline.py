"""The whole served pipeline in one process, over an exported model repository, with no Triton.

The `blip2` model's own code (Blip2Service) with the stateless stages run in-process instead of
through Triton: used by the parity tests and as the "in-process" baseline of the benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .service import Blip2Service, LocalStages


@dataclass
class Result:
    text: str
    token_ids: list[int]


class LocalPipeline:
    def __init__(self, repo: str | Path, threads: int | None = None):
        repo = Path(repo)
        self.stages = LocalStages(repo, threads)
        self.service = Blip2Service(repo, self.stages, threads=threads)
        self.generator = self.service.generator
        self.detokenizer = self.service.detokenizer

    def __call__(self, image: bytes, prompt: str = "", **controls: Any) -> Result:
        pieces = []
        request = self.service.prepare(image, prompt.encode("utf-8"), controls, emit=pieces.append)
        tokens = [int(t) for t in self.generator.engine.generate(request)]
        return Result("".join(p.text for p in pieces), tokens)
