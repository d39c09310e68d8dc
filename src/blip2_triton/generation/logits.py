"""transformers' logits processors for the controls in `GenerationParams`, in numpy.

Every function takes float32 scores `[rows, vocab]` and returns a new float32 array of the same
shape (the input is not modified). Processors that look at the past take `histories`: one 1-D
integer array per row with every token the processor should see, in order. transformers passes
the full `input_ids` there, so for BLIP-2 that is the image placeholder tokens, BOS and the prompt
followed by the tokens generated so far; the caller decides and passes it explicitly. (transformers
skips left padding for the repetition penalty but not for n-gram blocking; pass the unpadded
prompt, which only differs from transformers if the model itself generates padding n-grams.)

The float arithmetic follows transformers' float32 tensor arithmetic, so that scores, and the
argmax / top-k decisions made on them, agree bit for bit in all but pathological ties.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from blip2_triton.generation.params import GenerationParams

NEG_INF = np.float32(-np.inf)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis: [rows, vocab] -> [rows, vocab]."""
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(scores: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis, -inf entries get probability 0."""
    scores = np.asarray(scores, dtype=np.float32)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _history_mask(histories: Sequence[np.ndarray], rows: int, vocab: int) -> np.ndarray:
    """[rows, vocab] bool, True where the token occurs in the row's history (ids >= vocab ignored)."""
    if len(histories) != rows:
        raise ValueError(f"got {len(histories)} histories for {rows} rows of scores")
    mask = np.zeros((rows, vocab), dtype=bool)
    for row, history in enumerate(histories):
        tokens = np.asarray(history, dtype=np.int64)
        mask[row, tokens[tokens < vocab]] = True
    return mask


def apply_repetition_penalty(scores: np.ndarray, histories: Sequence[np.ndarray], penalty: float) -> np.ndarray:
    """CTRL repetition penalty: a seen token's score is divided by `penalty` if positive, else multiplied.

    Applied once per distinct token (`RepetitionPenaltyLogitsProcessor`).
    """
    scores = np.asarray(scores, dtype=np.float32)
    seen = _history_mask(histories, *scores.shape)
    penalised = np.where(scores < 0, scores * np.float32(penalty), scores / np.float32(penalty))
    return np.where(seen, penalised, scores)


def banned_ngram_tokens(history: np.ndarray, ngram_size: int) -> np.ndarray:
    """Tokens that would complete an n-gram already present in `history` (1-D ids, any order, may repeat).

    The next token is banned if the last `ngram_size - 1` tokens followed by it already occur as an
    n-gram (`NoRepeatNGramLogitsProcessor`).
    """
    history = np.asarray(history, dtype=np.int64)
    if len(history) < ngram_size:
        return history[:0]
    prefix = history[len(history) - ngram_size + 1 :]
    windows = np.lib.stride_tricks.sliding_window_view(history, ngram_size)
    # The window that would start at the prefix needs the token being chosen, so it is not in `windows`.
    matches = (windows[:, :-1] == prefix).all(axis=1)
    return windows[matches, -1]


def apply_no_repeat_ngram(scores: np.ndarray, histories: Sequence[np.ndarray], ngram_size: int) -> np.ndarray:
    """Set to -inf every token that would repeat an n-gram of size `ngram_size` of its row's history."""
    scores = np.array(scores, dtype=np.float32)
    vocab = scores.shape[-1]
    if len(histories) != scores.shape[0]:
        raise ValueError(f"got {len(histories)} histories for {scores.shape[0]} rows of scores")
    for row, history in enumerate(histories):
        banned = banned_ngram_tokens(history, ngram_size)
        scores[row, banned[banned < vocab]] = NEG_INF
    return scores


def suppress_tokens(scores: np.ndarray, token_ids: Sequence[int]) -> np.ndarray:
    """Set the given token ids to -inf in every row (used for EOS below `min_new_tokens`)."""
    scores = np.array(scores, dtype=np.float32)
    ids = [t for t in token_ids if t < scores.shape[-1]]
    scores[:, ids] = NEG_INF
    return scores


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    return np.asarray(scores, dtype=np.float32) / np.float32(temperature)


def apply_top_k(scores: np.ndarray, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Keep the `top_k` highest scores per row (ties with the k-th score are kept), -inf the rest."""
    scores = np.asarray(scores, dtype=np.float32)
    vocab = scores.shape[-1]
    k = min(max(top_k, min_tokens_to_keep), vocab)
    kth = np.partition(scores, vocab - k, axis=-1)[:, vocab - k : vocab - k + 1]
    return np.where(scores < kth, NEG_INF, scores)


def apply_top_p(scores: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches `top_p`.

    Like `TopPLogitsWarper`: sort ascending, drop tokens whose cumulative probability is
    <= 1 - top_p, always keep the `min_tokens_to_keep` most likely.
    """
    scores = np.asarray(scores, dtype=np.float32)
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    # torch's CPU cumsum accumulates float32 in double and rounds each partial sum back to float32.
    cumulative = np.cumsum(softmax(sorted_scores), axis=-1, dtype=np.float64).astype(np.float32)
    remove_sorted = cumulative <= np.float32(1.0 - top_p)
    remove_sorted[:, scores.shape[-1] - min_tokens_to_keep :] = False
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, NEG_INF, scores)


def process_scores(
    scores: np.ndarray,
    histories: Sequence[np.ndarray],
    num_generated: int,
    params: GenerationParams,
) -> np.ndarray:
    """Apply every processor `params` enables, in the order of transformers' `_get_logits_processor`.

    scores: [rows, vocab] float32, raw logits (greedy / sampling) or log-probs (beam search, which
    transformers log-softmaxes *before* processing). histories: per row, the ids the processors
    see. num_generated: tokens generated so far (the same for every row of a request).
    Order: repetition penalty, no-repeat-ngram, EOS suppression below min_new_tokens; then, only
    when sampling, temperature, top-k, top-p.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if params.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, histories, params.repetition_penalty)
    if params.no_repeat_ngram_size > 0:
        scores = apply_no_repeat_ngram(scores, histories, params.no_repeat_ngram_size)
    if params.eos_token_ids and num_generated < params.min_new_tokens:
        scores = suppress_tokens(scores, params.eos_token_ids)
    if params.do_sample:
        # Beam-sample would keep len(eos) + 1 tokens; GenerationParams rejects it, so 1 here.
        if params.temperature != 1.0:
            scores = apply_temperature(scores, params.temperature)
        if params.top_k != 0:
            scores = apply_top_k(scores, params.top_k)
        if params.top_p < 1.0:
            scores = apply_top_p(scores, params.top_p)
    return scores
