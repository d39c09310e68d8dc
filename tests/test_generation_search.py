"""The numpy decoders against transformers' `generate()` on a tiny random OPT, token for token.

The decoders are driven with logits from the torch model, re-run on the full sequences each step
(no cache), reordering rows with `parent_rows` exactly as the generator reorders its KV cache.
Every option case also checks that the option changes the output, so a decoder that ignored it
would fail.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from blip2_triton.generation import (  # noqa: E402
    BeamSearch,
    GenerationParams,
    GreedyOrSample,
    make_search,
    pad_outputs,
    step_batch,
)

PAD = 1
PROMPT = [2, 10, 11, 12, 13]
# Prompts of different lengths for the left-padded batch.
BATCH = [[2, 10, 11, 12, 13], [2, 40], [2, 7, 7, 8, 9, 30, 31]]
# With the seed below, greedy on PROMPT emits 5 27 48 56 57 5 5 5 ...: 56 comes at step 4, and
# beam search meets 53 and 87 on some beams, so these ids make EOS handling matter.
EARLY_EOS = 56


@pytest.fixture(scope="module")
def model():
    # A 32-wide model gains nothing from threads, and on a shared 2-core machine they cost seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        init_std=0.3,  # the default 0.02 gives one token repeated forever
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=PAD,
        dropout=0.0,
        attention_dropout=0.0,
    )
    yield transformers.OPTForCausalLM(config).eval()
    torch.set_num_threads(threads)


def _left_pad(prompts):
    width = max(map(len, prompts))
    rows = [[PAD] * (width - len(p)) + list(p) for p in prompts]
    masks = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return rows, masks


def run_decoders(model, decoders, prompts):
    """Drive decoders (one per prompt) with the torch model; one stacked model call per step."""
    rows, masks = _left_pad(prompts)
    active = list(decoders)
    while active:
        with torch.no_grad():
            out = model(input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks))
        step = step_batch(active, out.logits[:, -1].float().numpy())
        rows = [rows[p] + [int(t)] for p, t in zip(step.parent_rows, step.tokens)]
        masks = [masks[p] + [1] for p in step.parent_rows]
        active = [d for d in active if not d.finished]
    return [d.output_tokens() for d in decoders]


def run_numpy(model, params, prompts=(PROMPT,), calls=None):
    """Generated ids in transformers' padded layout; `calls` (a list) receives the model call count."""
    decoders = [make_search(params, p) for p in prompts]
    with _counting(model, calls):
        outputs = run_decoders(model, decoders, prompts)
    return pad_outputs(outputs, params.effective_pad_token_id)


class _counting:
    def __init__(self, model, calls):
        self.model, self.calls = model, calls

    def __enter__(self):
        self.count = 0

        def hook(*_):
            self.count += 1

        self.handle = self.model.register_forward_hook(hook)

    def __exit__(self, *exc):
        self.handle.remove()
        if self.calls is not None:
            self.calls.append(self.count)


def run_transformers(model, params, prompts=(PROMPT,), calls=None):
    rows, masks = _left_pad(prompts)
    with torch.no_grad(), _counting(model, calls):
        out = model.generate(
            torch.tensor(rows),
            attention_mask=torch.tensor(masks),
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens or None,
            num_beams=params.num_beams,
            do_sample=False,
            repetition_penalty=params.repetition_penalty,
            no_repeat_ngram_size=params.no_repeat_ngram_size,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            eos_token_id=list(params.eos_token_ids),
            pad_token_id=params.pad_token_id,
        )
    return out[:, len(rows[0]) :].numpy()


def params(**kwargs) -> GenerationParams:
    kwargs = {"max_new_tokens": 12, "eos_token_id": 2, "pad_token_id": PAD, **kwargs}
    return GenerationParams(**kwargs)


# name -> (params, params of a baseline the option must change or None, prompt)
CASES = {
    "greedy": (params(), None, PROMPT),
    "repetition_penalty": (params(repetition_penalty=1.5), params(), PROMPT),
    "repetition_reward": (params(repetition_penalty=0.7), params(), PROMPT),
    "no_repeat_ngram": (params(no_repeat_ngram_size=2), params(), PROMPT),
    "eos_stops": (params(eos_token_id=EARLY_EOS), params(), PROMPT),
    "min_new_tokens": (params(eos_token_id=EARLY_EOS, min_new_tokens=8), params(eos_token_id=EARLY_EOS), PROMPT),
    "two_eos_ids": (params(eos_token_id=[EARLY_EOS, 48]), params(eos_token_id=EARLY_EOS), PROMPT),
    "beam2_lp0.5": (params(num_beams=2, eos_token_id=87, length_penalty=0.5), None, PROMPT),
    "beam2_lp2": (
        params(num_beams=2, eos_token_id=87, length_penalty=2.0),
        params(num_beams=2, eos_token_id=87, length_penalty=0.5),
        PROMPT,
    ),
    "beam4_early_false": (params(num_beams=4, eos_token_id=53, early_stopping=False), None, PROMPT),
    "beam4_early_true": (
        params(num_beams=4, eos_token_id=53, early_stopping=True),
        params(num_beams=4, eos_token_id=53),
        PROMPT,
    ),
    "beam3_never_two_eos": (
        params(num_beams=3, eos_token_id=[57, 74], early_stopping="never", length_penalty=3.0, max_new_tokens=15),
        params(num_beams=3, eos_token_id=[57, 74], early_stopping=False, length_penalty=3.0, max_new_tokens=15),
        [2, 84, 63, 9],
    ),
    "beam4_penalties": (
        params(num_beams=4, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3),
        params(num_beams=4),
        PROMPT,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(model, name):
    case, baseline, prompt = CASES[name]
    ours, theirs = [], []
    expected = run_transformers(model, case, [prompt], calls=theirs)
    np.testing.assert_array_equal(run_numpy(model, case, [prompt], calls=ours), expected)
    if case.is_beam_search:  # and it stops after as many decoder calls (greedy may defer its stop check)
        assert ours == theirs
    if baseline is not None:
        assert not np.array_equal(expected, run_transformers(model, baseline, [prompt])), f"{name} has no effect"


def test_eos_and_min_new_tokens_semantics(model):
    stopped = run_numpy(model, params(eos_token_id=EARLY_EOS))[0]
    assert stopped.tolist()[-1] == EARLY_EOS and len(stopped) < 12
    held = run_numpy(model, params(eos_token_id=EARLY_EOS, min_new_tokens=8))[0]
    assert EARLY_EOS not in held[:8].tolist()


@pytest.mark.parametrize("eos", [2, EARLY_EOS])
def test_left_padded_batch_greedy(model, eos):
    case = params(max_new_tokens=10, eos_token_id=eos, repetition_penalty=1.2)
    expected = run_transformers(model, case, BATCH)
    np.testing.assert_array_equal(run_numpy(model, case, BATCH), expected)
    if eos == EARLY_EOS:  # one row stops early and is padded, the others go on
        assert (expected == PAD).any() and not (expected == PAD).all(axis=1).any()


def test_mixed_batch_equals_requests_alone(model):
    """Greedy and beam requests with different lengths share one call per step, as in the server."""
    cases = [params(max_new_tokens=6), params(num_beams=3, max_new_tokens=9), params(num_beams=2, eos_token_id=87)]
    prompts = [BATCH[0], BATCH[1], BATCH[2]]
    together = run_decoders(model, [make_search(c, p) for c, p in zip(cases, prompts)], prompts)
    for case, prompt, output in zip(cases, prompts, together):
        np.testing.assert_array_equal(output, run_transformers(model, case, [prompt])[0])


def test_beam_first_step_expands_the_prefilled_row():
    beam = BeamSearch(params(num_beams=4), PROMPT)
    assert beam.num_rows == 1
    logits = np.random.default_rng(0).standard_normal((1, 100)).astype(np.float32)
    result = beam.step(logits)
    assert result.parent_rows.tolist() == [0, 0, 0, 0]
    # the four best first tokens, best first, as the KV rows' next inputs
    assert result.tokens.tolist() == np.argsort(-logits[0])[:4].tolist()
    assert beam.num_rows == 4 and result.emitted.size == 0 and not result.finished
    with pytest.raises(ValueError, match="shape"):
        beam.step(logits)


def test_beam_first_step_parents_stay_in_range_for_a_tiny_vocab():
    # 4 beams x 2 candidates > 3 tokens: transformers then also takes candidates of the (identical,
    # -1e9-scored) beam copies; they must still point at the single prefilled row.
    beam = BeamSearch(params(num_beams=4, eos_token_id=[]), PROMPT)
    result = beam.step(np.array([[0.0, 1.0, 2.0]], dtype=np.float32))
    assert result.parent_rows.tolist() == [0, 0, 0, 0]


def test_beam_keeps_live_beams_when_several_eos_ids_dominate():
    """K = (1 + number of EOS ids) x num_beams candidates leave num_beams non-EOS continuations."""
    eos = [0, 1]
    # "never" with a length bonus keeps the search going although finished hypotheses score well
    case = params(num_beams=2, eos_token_id=eos, max_new_tokens=6, early_stopping="never", length_penalty=2.0)
    beam = BeamSearch(case, PROMPT)
    logits = np.linspace(0.0, -3.0, 10, dtype=np.float32)
    logits[:2] = 0.5  # both EOS ids are the best tokens of every beam at every step
    fed_back, steps = [], 0
    while not beam.finished:
        result = beam.step(np.tile(logits, (beam.num_rows, 1)))
        fed_back.extend(result.tokens.tolist())
        steps += 1
    # with only 2 x num_beams candidates all would be EOS at step 2 and the search would end there
    assert steps == 6 and not set(fed_back) & set(eos)
    assert beam.output_tokens().tolist() == [2, 2, 2, 2, 2, 0]


def test_emitted_tokens_concatenate_to_the_output(model):
    for case in (params(eos_token_id=EARLY_EOS), params(num_beams=2, eos_token_id=87, length_penalty=0.5)):
        decoder = make_search(case, PROMPT)
        emitted, rows = [], [list(PROMPT)]
        while not decoder.finished:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(rows)).logits[:, -1].numpy()
            result = decoder.step(logits)
            emitted.extend(result.emitted.tolist())
            rows = [rows[p] + [int(t)] for p, t in zip(result.parent_rows, result.tokens)]
        assert emitted == decoder.output_tokens().tolist() and emitted[-1] == case.eos_token_ids[0]
        with pytest.raises(RuntimeError):
            decoder.step(logits)


def _sample(model, **kwargs):
    return run_numpy(model, params(do_sample=True, eos_token_id=[], max_new_tokens=10, **kwargs))[0].tolist()


def test_sampling_is_reproducible_per_seed(model):
    assert _sample(model, seed=7, top_k=20, top_p=0.9) == _sample(model, seed=7, top_k=20, top_p=0.9)
    runs = {tuple(_sample(model, seed=s, temperature=1.5)) for s in range(4)}
    assert len(runs) > 1, "different seeds should give different samples"


def test_sampling_top_k_1_is_greedy(model):
    greedy = run_numpy(model, params(eos_token_id=[], max_new_tokens=10))[0].tolist()
    assert _sample(model, seed=3, top_k=1, temperature=0.5) == greedy


def test_decoder_kind_is_checked():
    with pytest.raises(ValueError, match="BeamSearch"):
        GreedyOrSample(params(num_beams=2), PROMPT)
    with pytest.raises(ValueError, match="GreedyOrSample"):
        BeamSearch(params(), PROMPT)
