"""Incremental detokenization without state between calls.

The engine calls back with every token generated so far and how many are new; `piece` returns
the text those new tokens add. The rule streaming clients rely on: the pieces of a request
concatenate to `tokenizer.decode(all ids, skip_special_tokens=True)`, the one-shot text.

That holds by construction when decoding is prefix-stable: the text of ids[:k] (without a trailing
U+FFFD) is a prefix of the text of ids[:k+m]. A byte-level BPE decoder (GPT-2/OPT) only
concatenates the tokens' bytes and decodes them as UTF-8, so it is, except for a token that ends
inside a multi-byte character: that decodes to U+FFFD until the next token completes it, hence the
trailing U+FFFD is held back. A SentencePiece Metaspace decoder (T5) turns each piece's "▁" into a
space and drops only the first piece's leading one, which later pieces cannot change: it is too. transformers' `clean_up_tokenization` (which
turns "it '" + "s" into "it's") would break it; transformers 5 skips it for BPE tokenizers unless
forced. For any other decoder, or when decode does clean up, no text is sent before the final
piece (streaming still answers per token, with empty text), so the rule holds there too.
"""
from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"
PREFIX_STABLE_DECODERS = ("ByteLevel", "Metaspace")
# Every pattern transformers' clean_up_tokenization rewrites: decode applies it iff these change.
_CLEANUP_PROBE = "a . b ? c ! d , e ' f n't g 'm h 's i 've j 're"


def prefix_stable(tokenizer) -> bool:
    """Whether decode(ids[:k]) minus a trailing U+FFFD is always a prefix of decode(ids[:k+m])."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ not in PREFIX_STABLE_DECODERS:
        return False
    ids = tokenizer(_CLEANUP_PROBE, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.incremental = prefix_stable(tokenizer)

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def settled_text(self, ids: Sequence[int]) -> str:
        """The part of ids' text that no later token can change (all of it but an incomplete last
        character, or nothing when decoding is not prefix-stable)."""
        return self.text(ids).rstrip(REPLACEMENT) if self.incremental else ""

    def piece(self, ids: Sequence[int], new_count: int, final: bool = False) -> str:
        """Text added by the last `new_count` of `ids` since the previous piece.

        With `final`, everything left goes out, a trailing incomplete character as U+FFFD (it
        will not be completed).
        """
        before = self.settled_text(ids[: len(ids) - new_count])
        after = self.text(ids) if final else self.settled_text(ids)
        if not after.startswith(before):
            # Cannot happen for the decoders `prefix_stable` admits; an error beats a wrong stream.
            raise RuntimeError(f"decoding is not prefix-stable here: {before!r} -> {after!r}")
        return after[len(before) :]
