"""The numpy logits processors against transformers' torch processors, and sampling's allowed set."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

from blip2_triton.generation import GenerationParams, GreedyOrSample, process_scores  # noqa: E402
from blip2_triton.generation import logits as L  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def scores():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, VOCAB)) * 3).astype(np.float32)
    x[0, :7] = -np.inf  # rows as they look after an earlier processor
    x[1, 10:14] = x[1, 20]  # ties
    return x


@pytest.fixture(scope="module")
def histories():
    rng = np.random.default_rng(1)
    # a small alphabet so that n-grams repeat; ids >= VOCAB are ignored, as in transformers
    h = rng.integers(0, 6, size=(5, 40))
    h[2, 5] = VOCAB + 3
    return list(h)


def _torch(processor, scores, histories):
    return processor(torch.tensor(np.stack(histories)), torch.from_numpy(scores.copy())).numpy()


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty(scores, histories, penalty):
    ours = L.apply_repetition_penalty(scores, histories, penalty)
    np.testing.assert_array_equal(ours, _torch(lp.RepetitionPenaltyLogitsProcessor(penalty), scores, histories))
    assert not np.array_equal(ours, scores)


@pytest.mark.parametrize("n", [1, 2, 3, 41])
def test_no_repeat_ngram(scores, histories, n):
    ours = L.apply_no_repeat_ngram(scores, histories, n)
    np.testing.assert_array_equal(ours, _torch(lp.NoRepeatNGramLogitsProcessor(n), scores, histories))
    assert (np.isinf(ours).sum() > np.isinf(scores).sum()) == (n <= 40)


def test_ngram_bans_exactly_the_continuations():
    # history "7 8 9 7 8": the bigram prefix (8,) was followed by 9 -> 9 is banned; trigram (7, 8) -> 9
    assert L.banned_ngram_tokens(np.array([7, 8, 9, 7, 8]), 2).tolist() == [9]
    assert L.banned_ngram_tokens(np.array([7, 8, 9, 7, 8]), 3).tolist() == [9]
    assert L.banned_ngram_tokens(np.array([7, 8, 9, 7, 8]), 4).tolist() == []


@pytest.mark.parametrize("k", [1, 5, 50, VOCAB + 5])
def test_top_k(scores, histories, k):
    np.testing.assert_array_equal(L.apply_top_k(scores, k), _torch(lp.TopKLogitsWarper(k), scores, histories))


def test_top_k_keeps_ties_with_the_kth_score(scores, histories):
    tied = scores.copy()
    tied[:, 10:14] = tied.max() + 1.0
    ours = L.apply_top_k(tied, 2)
    np.testing.assert_array_equal(ours, _torch(lp.TopKLogitsWarper(2), tied, histories))
    assert (np.isfinite(ours).sum(axis=1) == 4).all()


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p(scores, histories, p):
    ours = L.apply_top_p(scores, p)
    np.testing.assert_array_equal(ours, _torch(lp.TopPLogitsWarper(p), scores, histories))
    assert np.isfinite(ours).sum(axis=1).min() >= 1


def test_temperature(scores, histories):
    expected = _torch(lp.TemperatureLogitsWarper(0.7), scores, histories)
    np.testing.assert_array_equal(L.apply_temperature(scores, 0.7), expected)


def test_min_new_tokens_suppresses_eos_until_reached(scores, histories):
    params = GenerationParams(eos_token_id=[3, 4], min_new_tokens=2)
    before = process_scores(scores, histories, 1, params)
    assert np.isneginf(before[:, [3, 4]]).all()
    np.testing.assert_array_equal(process_scores(scores, histories, 2, params), scores)


def test_log_softmax_close_to_torch(scores):
    ref = torch.log_softmax(torch.from_numpy(scores), -1).numpy()
    np.testing.assert_allclose(L.log_softmax(scores), ref, rtol=0, atol=1e-5)


def _allowed(logits, params):
    """The tokens transformers' warpers leave finite, in transformers' order."""
    t = torch.from_numpy(logits)
    for warper in (
        lp.TemperatureLogitsWarper(params.temperature),
        lp.TopKLogitsWarper(params.top_k) if params.top_k else None,
        lp.TopPLogitsWarper(params.top_p) if params.top_p < 1.0 else None,
    ):
        if warper is not None:
            t = warper(None, t)
    return set(np.flatnonzero(np.isfinite(t.numpy()[0])).tolist())


@pytest.mark.parametrize(
    "controls",
    [
        dict(top_k=5),
        dict(top_p=0.6, top_k=0),
        dict(top_k=20, top_p=0.8, temperature=0.6),
        dict(top_k=3, temperature=3.0),
    ],
)
def test_sampled_tokens_stay_in_the_allowed_set(controls):
    params = GenerationParams(do_sample=True, seed=11, max_new_tokens=200, **controls)
    decoder = GreedyOrSample(params, [])
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(200):
        logits = (rng.standard_normal((1, 50)) * 2).astype(np.float32)
        token = int(decoder.step(logits).emitted[0])
        allowed = _allowed(logits, params)
        assert token in allowed
        seen.add((token, len(allowed)))
    # it does sample: not always the argmax
    assert len({t for t, _ in seen}) > 5
