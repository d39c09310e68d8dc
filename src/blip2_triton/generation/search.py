"""Step-wise searches that turn each step's logits into the next tokens, as `model.generate()` does.

The engine owns the language model and its cache; these classes own only the search. One
search serves one request. Per step the caller runs the language model on the search's `num_rows`
rows, passes the last-position logits `[num_rows, vocab]` to `step()` and gets a `StepResult`:

* `tokens[i]` is the input token of next step's row i, which continues this step's row
  `parent_rows[i]`; the caller gathers its KV-cache rows with `parent_rows` (beam search
  reorders and, on its first step, expands the single prefilled row to `num_beams` rows);
* `emitted` are the ids appended to the request's output by this step, for streaming: greedy /
  sampling emits one token per step, beam search emits its whole best hypothesis on the last step
  (it is not known before). Concatenating every step's `emitted` gives `output_tokens()`;
* `finished`: no more steps; `tokens` and `parent_rows` are then empty.

Many requests share one LLM call with `step_batch`, which slices the stacked logits by each
search's `num_rows` and returns the next rows of the still-running searches, with `parent_rows`
indexing the stacked input rows.

Output convention: `output_tokens()` is the generated ids only (no prompt), ending with the EOS
token when the request stopped on one, without padding. transformers right-pads a batch with
`pad_token_id` after EOS; `pad_outputs` builds that layout when needed.

Each request decodes exactly as `generate()` would decode it alone (for requests of a batch with
the same max_new_tokens, as the batched `generate()` call).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from blip2_triton.generation.logits import log_softmax, process_scores, softmax
from blip2_triton.generation.params import GenerationParams

# transformers' sentinel for "cannot be selected" in beam search; the same float32 value (exactly
# representable) keeps the arithmetic, and so the rankings, identical.
_NEG = np.float32(-1.0e9)
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one `step()` decided (see the module docstring).

    tokens: int64 [next_rows], input token of each next row.
    parent_rows: int64 [next_rows], index of the row (of this step's logits) each next row continues.
    emitted: int64 [n], ids appended to the output by this step.
    finished: True when the request needs no further step (then next_rows == 0).
    """

    tokens: np.ndarray
    parent_rows: np.ndarray
    emitted: np.ndarray
    finished: bool


def _check_logits(logits: np.ndarray, rows: int) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != rows:
        raise ValueError(f"expected logits of shape [{rows}, vocab], got {list(logits.shape)}")
    return logits


def _top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first; ties go to the lower index."""
    if k < values.size:
        kth = np.partition(values, values.size - k)[values.size - k]
        candidates = np.flatnonzero(values >= kth)
    else:
        candidates = np.arange(values.size)
    order = np.argsort(-values[candidates], kind="stable")
    return candidates[order[:k]]


class Search:
    """One request's decoding strategy over its rows (greedy, sampling, beam search): the params,
    the prompt history and the finished flag; subclasses decide the tokens."""

    def __init__(self, params: GenerationParams, prompt_tokens: Sequence[int] | np.ndarray):
        self.params = params
        self.prompt_tokens = np.asarray(prompt_tokens, dtype=np.int64).reshape(-1)
        self.finished = False
        self._eos = np.asarray(params.eos_token_ids, dtype=np.int64)

    @property
    def num_rows(self) -> int:
        """Rows of logits the next `step()` expects (0 once finished)."""
        raise NotImplementedError

    def step(self, logits: np.ndarray) -> StepResult:
        raise NotImplementedError

    def output_tokens(self) -> np.ndarray:
        raise NotImplementedError

    def _check_running(self) -> None:
        if self.finished:
            raise RuntimeError("step() called on a finished search")


class GreedyOrSample(Search):
    """Greedy decoding or multinomial sampling (`num_beams == 1`): one row per request.

    prompt_tokens: the ids the repetition penalty and n-gram blocking see before the first
    generated token (for BLIP-2: the image placeholder tokens, BOS and the prompt, no padding).
    Sampling draws from a `numpy.random.Generator` seeded with `params.seed` (fresh entropy when
    None): the same seed and logits give the same tokens, though not torch's random stream.
    """

    def __init__(self, params: GenerationParams, prompt_tokens: Sequence[int] | np.ndarray):
        if params.num_beams != 1:
            raise ValueError(f"GreedyOrSample needs num_beams == 1, got {params.num_beams}; use BeamSearch")
        super().__init__(params, prompt_tokens)
        self._generated: list[int] = []
        self._rng = np.random.default_rng(params.seed) if params.do_sample else None

    @property
    def num_rows(self) -> int:
        return 0 if self.finished else 1

    def step(self, logits: np.ndarray) -> StepResult:
        """logits: [1, vocab] float, the last position's logits of this request's row."""
        self._check_running()
        logits = _check_logits(logits, 1)
        history = np.concatenate([self.prompt_tokens, np.asarray(self._generated, dtype=np.int64)])
        scores = process_scores(logits, [history], len(self._generated), self.params)[0]
        token = self._sample(scores) if self._rng is not None else int(np.argmax(scores))
        self._generated.append(token)
        self.finished = bool(np.isin(token, self._eos)) or len(self._generated) >= self.params.max_new_tokens
        emitted = np.asarray([token], dtype=np.int64)
        if self.finished:
            return StepResult(_EMPTY, _EMPTY, emitted, True)
        return StepResult(emitted, np.zeros(1, dtype=np.int64), emitted, False)

    def _sample(self, scores: np.ndarray) -> int:
        probs = softmax(scores).astype(np.float64)
        cdf = np.cumsum(probs)
        pick = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        # Rounding can push the draw to the very end; never return a token filtered to probability 0.
        return min(pick, int(np.flatnonzero(probs > 0)[-1]))

    def output_tokens(self) -> np.ndarray:
        """Generated ids so far (all of them once finished), ending with EOS if it stopped on one."""
        return np.asarray(self._generated, dtype=np.int64)


class BeamSearch(Search):
    """transformers' beam search (`num_beams > 1`, no sampling) for one request.

    The first step takes the single prefilled row and returns `num_beams` next rows, all with
    parent row 0; later steps take and return `num_beams` rows. Follows `GenerationMixin._beam_search`:
    candidates are ranked by the accumulated log-softmax of the *processed* log-probs; each step
    keeps the top (1 + number of EOS ids, at least 2) x num_beams candidates, continues the best
    `num_beams` that did not stop, and offers stopping candidates ranked within the top `num_beams`
    to the finished pool, scored as sum_logprob / generated_length ** length_penalty (the length
    counts the EOS token). `early_stopping`: True stops once `num_beams` hypotheses are finished;
    False stops when the best running beam, normalised by its current length, cannot beat the worst
    finished one; "never" uses `max_new_tokens` as that length when length_penalty > 0.
    The output is the best finished hypothesis.
    """

    def __init__(self, params: GenerationParams, prompt_tokens: Sequence[int] | np.ndarray):
        if params.num_beams < 2 or params.do_sample:
            raise ValueError("BeamSearch needs num_beams > 1 and do_sample=False; use GreedyOrSample")
        super().__init__(params, prompt_tokens)
        nb, length = params.num_beams, params.max_new_tokens
        self._num_candidates = max(2, 1 + len(self._eos)) * nb
        self._step = 0
        # Running beams: generated ids and accumulated log-prob. Like transformers, beam 0 starts
        # at 0 and the others at -1e9, so the first step only expands beam 0 (the prompt).
        self._running_tokens = np.zeros((nb, length), dtype=np.int64)
        self._running_scores = np.full(nb, _NEG, dtype=np.float32)
        self._running_scores[0] = 0.0
        # Finished pool of num_beams slots, best first; an unfilled slot scores -1e9.
        self._final_tokens = np.zeros((nb, length), dtype=np.int64)
        self._final_lengths = np.zeros(nb, dtype=np.int64)
        self._final_scores = np.full(nb, _NEG, dtype=np.float32)
        self._final_done = np.zeros(nb, dtype=bool)
        # transformers' `is_early_stop_heuristic_unsatisfied`: can a running beam still improve the pool?
        # (Sticky in transformers; here the request stops as soon as it turns False.)
        self._improvable = True

    @property
    def num_rows(self) -> int:
        if self.finished:
            return 0
        return 1 if self._step == 0 else self.params.num_beams

    def step(self, logits: np.ndarray) -> StepResult:
        """logits: [num_rows, vocab] float, the last position's logits of this request's rows."""
        self._check_running()
        params, nb, t = self.params, self.params.num_beams, self._step
        logits = _check_logits(logits, self.num_rows)
        if t == 0:
            logits = np.repeat(logits, nb, axis=0)  # transformers runs num_beams copies of the prompt
        vocab = logits.shape[1]

        histories = [np.concatenate([self.prompt_tokens, beam[:t]]) for beam in self._running_tokens]
        log_probs = process_scores(log_softmax(logits), histories, t, params)
        accumulated = (log_probs + self._running_scores[:, None]).reshape(-1)

        # Candidates: the best K continuations over all beams, K leaves num_beams non-EOS ones.
        cand = _top_indices(accumulated, self._num_candidates)
        cand_scores = accumulated[cand]
        cand_beams, cand_tokens = np.divmod(cand, vocab)
        cand_seqs = self._running_tokens[cand_beams]
        cand_seqs[:, t] = cand_tokens
        stops = np.isin(cand_tokens, self._eos) | (t + 1 >= params.max_new_tokens)

        # Continue with the best num_beams candidates that did not stop.
        running_rank = cand_scores + stops.astype(np.float32) * _NEG
        keep = _top_indices(running_rank, nb)
        self._running_tokens = cand_seqs[keep]
        self._running_scores = running_rank[keep]
        parents = np.zeros(nb, dtype=np.int64) if t == 0 else cand_beams[keep]

        self._update_finished(cand_scores, cand_seqs, stops, t)
        self._step = t + 1
        self._update_improvable()

        pool_full = bool(self._final_done.all()) and params.early_stopping is True
        self.finished = not self._improvable or pool_full or bool(stops.all())
        if self.finished:
            return StepResult(_EMPTY, _EMPTY, self.output_tokens(), True)
        return StepResult(self._running_tokens[:, t].copy(), parents, _EMPTY, False)

    def _update_finished(self, cand_scores, cand_seqs, stops, t) -> None:
        """Merge the stopping candidates ranked within the top num_beams into the finished pool."""
        nb = self.params.num_beams
        just_finished = stops & (np.arange(len(stops)) < nb)
        scores = cand_scores / np.float32((t + 1) ** self.params.length_penalty)
        # transformers also blocks the pool of a batch item that is done (pool full with
        # early_stopping=True, or no possible improvement) while other items go on; a request here
        # stops at that point, so only candidates that did not just finish are blocked.
        scores = scores + (~just_finished).astype(np.float32) * _NEG

        merged_scores = np.concatenate([self._final_scores, scores])
        best = _top_indices(merged_scores, nb)
        self._final_scores = merged_scores[best]
        self._final_tokens = np.concatenate([self._final_tokens, cand_seqs])[best]
        self._final_lengths = np.concatenate([self._final_lengths, np.full(len(stops), t + 1)])[best]
        self._final_done = np.concatenate([self._final_done, just_finished])[best]

    def _update_improvable(self) -> None:
        """transformers' `_check_early_stop_heuristic`, after the step counter moved on."""
        params = self.params
        if params.early_stopping == "never" and params.length_penalty > 0.0:
            best_length = params.max_new_tokens
        else:
            best_length = self._step
        best_running = self._running_scores[0] / np.float32(best_length**params.length_penalty)
        worst_final = np.where(self._final_done, self._final_scores.min(), _NEG)
        self._improvable = bool(np.any(best_running > worst_final))

    def output_tokens(self) -> np.ndarray:
        """The best finished hypothesis' generated ids, ending with EOS if it stopped on one."""
        if not self.finished:
            raise RuntimeError("beam search output is only known once the search has finished")
        return self._final_tokens[0, : self._final_lengths[0]].copy()


def make_search(params: GenerationParams, prompt_tokens: Sequence[int] | np.ndarray) -> GreedyOrSample | BeamSearch:
    """The search `params` asks for: beam search when num_beams > 1, else greedy / sampling."""
    if params.is_beam_search:
        return BeamSearch(params, prompt_tokens)
    return GreedyOrSample(params, prompt_tokens)


@dataclasses.dataclass(frozen=True)
class BatchStep:
    """Result of `step_batch`.

    tokens: int64 [next_rows], input tokens of the next call's rows, which belong, in order, to the
    searches still running (`[s for s in searches if not s.finished]`).
    parent_rows: int64 [next_rows], index into this call's stacked rows that each next row continues
    (gather the KV cache with it; rows of finished requests simply drop out).
    results: one StepResult per search, in order (per-request `emitted` and `finished`).
    """

    tokens: np.ndarray
    parent_rows: np.ndarray
    results: list[StepResult]


def step_batch(searches: Sequence[GreedyOrSample | BeamSearch], logits: np.ndarray) -> BatchStep:
    """Step several requests whose rows were stacked into one LLM call.

    searches: running searches, in the order of their rows. logits: [sum(s.num_rows), vocab].
    """
    counts = [s.num_rows for s in searches]
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != sum(counts):
        raise ValueError(f"expected logits of shape [{sum(counts)}, vocab], got {list(logits.shape)}")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    results, tokens, parents = [], [], []
    for search, start, stop in zip(searches, offsets[:-1], offsets[1:]):
        result = search.step(logits[start:stop])
        results.append(result)
        tokens.append(result.tokens)
        parents.append(result.parent_rows + start)
    return BatchStep(
        tokens=np.concatenate(tokens) if tokens else _EMPTY,
        parent_rows=np.concatenate(parents) if parents else _EMPTY,
        results=results,
    )


def pad_outputs(outputs: Sequence[np.ndarray], pad_token_id: int) -> np.ndarray:
    """Right-pad outputs to [len(outputs), longest] with `pad_token_id`, transformers' batch layout.

    For greedy / sampling transformers pads with `params.effective_pad_token_id`; for beam search it
    pads with `pad_token_id or eos_token_id[0]`, i.e. with the EOS id when pad_token_id is 0.
    """
    longest = max((len(o) for o in outputs), default=0)
    padded = np.full((len(outputs), longest), pad_token_id, dtype=np.int64)
    for row, output in enumerate(outputs):
        padded[row, : len(output)] = output
    return padded
