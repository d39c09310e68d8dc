"""Incremental detokenization without state between calls.

The postprocess model sees each streamed response on its own, so it is given every token generated
so far and how many are new; it returns the text those new tokens add. Text is emitted only up to
the last complete character: a byte-level BPE token can end inside a multi-byte UTF-8 character,
which decodes to U+FFFD until the next token completes it.
"""
from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def stable_text(self, ids: Sequence[int]) -> str:
        """Decoded text of `ids`, without a trailing incomplete character."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return text.rstrip(REPLACEMENT)

    def piece(self, ids: Sequence[int], new_count: int, final: bool = False) -> str:
        """Text added by the last `new_count` of `ids` since the previous piece.

        With `final`, a trailing incomplete character is flushed as U+FFFD (it will not be completed).
        """
        before = self.stable_text(ids[: len(ids) - new_count])
        after = self.tokenizer.decode(list(ids), skip_special_tokens=True) if final else self.stable_text(ids)
        if not after.startswith(before):
            # Decoding is not prefix-stable for this token pair (rare, tokenizer clean-up rules);
            # fall back to the difference after the common prefix so pieces still concatenate.
            common = 0
            while common < min(len(before), len(after)) and before[common] == after[common]:
                common += 1
            return after[common:]
        return after[len(before) :]
