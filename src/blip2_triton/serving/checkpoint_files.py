"""The exported checkpoint's config, generation config and tokenizer, read without transformers.

transformers' configuration module imports torch whenever torch is installed, which made the
`blip2` process (it holds no torch weights) a PyTorch runtime's size. The server needs a few
config values, the generation config as a dict (generation.GenerationParams resolves transformers'
defaults itself), and the tokenizer, which the `tokenizers` library runs (as transformers' fast
tokenizers do). tests/test_serving_units.py holds these readers to transformers' own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

# Blip2Config's own defaults for the top-level values the server reads (save_pretrained writes
# only what differs from them; the sub-configs are written in full).
BLIP2_DEFAULTS = {"num_query_tokens": 32, "image_token_index": None}
# transformers' model_max_length when a tokenizer sets none (VERY_LARGE_INTEGER).
UNLIMITED = int(1e30)


class Config:
    """Read-only attribute view of a config.json dict; `*_config` entries are Configs too."""

    def __init__(self, values: dict[str, Any], defaults: dict[str, Any] | None = None):
        self._values = values
        self._defaults = defaults or {}

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._values:
            value = self._values[name]
            return Config(value) if name.endswith("_config") and isinstance(value, dict) else value
        if name in self._defaults:
            return self._defaults[name]
        raise AttributeError(f"config has no {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return self._defaults | self._values


def load_config(assets: str | Path) -> Config:
    """config.json of an exported checkpoint's assets directory."""
    return Config(json.loads((Path(assets) / "config.json").read_text()), BLIP2_DEFAULTS)


def load_generation_config(assets: str | Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when the checkpoint has none)."""
    path = Path(assets) / "generation_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


class Tokenizer:
    """The checkpoint's fast tokenizer (tokenizer.json) with the part of transformers' interface
    the server uses: __call__ -> {"input_ids"}, decode, model_max_length, backend_tokenizer."""

    def __init__(self, assets: str | Path):
        from tokenizers import Tokenizer as Backend

        assets = Path(assets)
        self.backend_tokenizer = Backend.from_file(str(assets / "tokenizer.json"))
        path = assets / "tokenizer_config.json"
        settings = json.loads(path.read_text()) if path.exists() else {}
        self.model_max_length = int(settings.get("model_max_length") or UNLIMITED)
        # transformers 5's default is no clean-up, and it never cleans up after a BPE model (GPT-2 /
        # OPT) unless forced: the clean-up would strip real spaces before punctuation.
        bpe = type(self.backend_tokenizer.model).__name__ == "BPE"
        self.clean_up_tokenization_spaces = bool(settings.get("clean_up_tokenization_spaces", False)) and (
            not bpe or bool(settings.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        text = self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is False or not self.clean_up_tokenization_spaces:
            return text  # (a True argument does not override the BPE rule either, as in transformers)
        return clean_up_tokenization(text)


def clean_up_tokenization(text: str) -> str:
    """transformers' PreTrainedTokenizerBase.clean_up_tokenization."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
