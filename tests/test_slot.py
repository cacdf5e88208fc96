"""The score slot's constrained probabilities, against hand-computed cases."""

import math

import numpy as np
import pytest

from rpra.prediction import Prediction
from rpra.slot import ScoreSlot

VOCAB = 50
ONE, ZERO, TWO, CLOSE, OTHER = 1, 0, 2, 9, 30  # token ids of "1", "0", "2", "]]" and an unrelated token


def logits_table(table: dict[tuple, dict[int, float]]):
    """A fake model: logits after each slot path, every unlisted token at -inf-ish."""
    calls = []

    def next_logits(path):
        calls.append(tuple(path))
        row = np.full(VOCAB, -50.0)
        for token, value in table[tuple(path)].items():
            row[token] = value
        return row

    return next_logits, calls


def test_single_token_labels_get_the_softmax_over_allowed_tokens_only():
    slot = ScoreSlot([[ONE], [TWO]], CLOSE)
    # An unrelated token with a huge logit must not take probability from the grammar's labels.
    fn, _ = logits_table({(): {ONE: math.log(3), TWO: math.log(1), OTHER: 100.0}})
    probs = np.exp(slot.logprobs(fn))
    assert probs == pytest.approx([0.75, 0.25])


def test_multi_token_label_shares_a_prefix_and_parts_at_the_closing_token():
    # Labels "1", "2", "10": "10" is "1","0". P(1) = P("1") * P("]]" | "1"), P(10) = P("1") * P("0" | "1").
    slot = ScoreSlot([[ONE], [TWO], [ONE, ZERO]], CLOSE)
    fn, calls = logits_table({
        (): {ONE: math.log(0.6), TWO: math.log(0.4)},
        (ONE,): {CLOSE: math.log(1), ZERO: math.log(3)},
    })
    probs = np.exp(slot.logprobs(fn))
    assert probs == pytest.approx([0.6 * 0.25, 0.4, 0.6 * 0.75])
    assert probs.sum() == pytest.approx(1.0)
    assert calls == [(), (ONE,)]  # one extra decode, only at the branching point


def test_identical_tokenizations_are_rejected():
    with pytest.raises(ValueError):
        ScoreSlot([[ONE], [ONE]], CLOSE)


def test_prediction_summaries():
    p = Prediction.from_logprobs([math.log(w) for w in (1, 1, 2)], pass_mark=3)
    assert p.probs == pytest.approx((0.25, 0.25, 0.5))
    assert p.expected == pytest.approx(2.25)
    assert p.p_pass == pytest.approx(0.5)
    assert p.mode == 3
    assert p.to_dict()["distribution"] == {"1": 0.25, "2": 0.25, "3": 0.5}


def test_prediction_rejects_non_distributions():
    with pytest.raises(ValueError):
        Prediction((0.5, 0.6), pass_mark=1)
    with pytest.raises(ValueError):
        Prediction((0.5, 0.5), pass_mark=3)
