"""Baselines a trained predictor must beat, as predictions a record can hold (pure: no model).

- **Category prior**: the pass rate of the item's suite and category on the train split. It is
  what a report card mostly supplies; a predictor that does not beat it has learned nothing
  about the item itself, only its category.
- **Answer confidence**: the local answer's mean (or minimum) token log-probability. It sees the
  answer, so it is a baseline for decisions made *after* the draft, not before it.
- **Self-verification** (AutoMix's method, on our device model): the device model is shown its
  answer and asked, few-shot, whether it is correct (``prompts.self_check_messages``); the
  probability of "Yes" against "No" at the reply's first token is the score. One prefill, no
  decode. It also sees the answer. The only baseline here that runs the model.

Each is written as a prediction dict with ``p_pass`` (and an ``expected`` score on the 1..10
scale, monotone in it) so the benchmark ranks and thresholds it with the controller's rule like
any predictor.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

from rpra import prompts

# Smoothing towards the next coarser rate: a category seen 3 times does not get a rate of 0 or 1.
_PSEUDO = 2.0


def category_prior(train: Iterable[dict], outcome: Callable[[dict], bool | None] | None = None) -> Callable[[dict], float]:
    """P(pass) of a record from the train records' labels: the rate of its (suite, category),
    shrunk towards its suite's rate, shrunk towards the overall rate (``_PSEUDO`` pseudo-counts
    each). ``outcome``: what is counted (default the local label's pass; e.g.
    ``collection.remote_passed`` for the remote's rate); records where it is None are skipped."""
    outcome = outcome or (lambda r: (r.get("label") or {}).get("pass"))
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])  # key -> [passed, seen]
    for r in train:
        passed = outcome(r)
        if passed is None:
            continue
        for key in ((), (r.get("suite"),), (r.get("suite"), r.get("category"))):
            counts[key][0] += int(passed)
            counts[key][1] += 1
    if not counts[()][1]:
        raise ValueError("The category prior needs labelled train records; there are none.")

    def rate(key: tuple, toward: float) -> float:
        passed, seen = counts.get(key, (0, 0))
        return (passed + _PSEUDO * toward) / (seen + _PSEUDO)

    overall = counts[()][0] / counts[()][1]

    def prior(record: dict) -> float:
        suite = rate((record.get("suite"),), overall)
        return rate((record.get("suite"), record.get("category")), suite)

    return prior


def as_prediction(p_pass: float, *, predictor: str, scale_max: int = 10, p_remote: float | None = None) -> dict:
    """A P(pass) (and a P(remote passes)) as the prediction fields the benchmark reads."""
    remote = {} if p_remote is None else {"p_remote": p_remote, "advantage": p_pass - p_remote}
    return {"predictor": predictor, "p_pass": p_pass, "expected": 1 + (scale_max - 1) * p_pass, **remote}


def answer_confidence(record: dict, *, which: str = "mean") -> float | None:
    """exp(mean or min token log-probability) of the local answer, in (0, 1]; None if not recorded."""
    logprobs = record.get("local_logprobs")
    if not logprobs or logprobs.get(which) is None:
        return None
    return math.exp(logprobs[which])


def self_verification(local, question: str, answer: str) -> float:
    """P("Yes") / (P("Yes") + P("No")) of the device model ``local`` (a ``LocalModel``) asked
    whether ``answer`` to ``question`` is correct; it takes the model's lock."""
    from rpra.slot import ScoreSlot

    slot = ScoreSlot([local.tokenize(prompts.SELF_CHECK_YES), local.tokenize(prompts.SELF_CHECK_NO)], local.end_of_turn)
    with local.lock:
        session = local.session(local.chat_tokens(prompts.self_check_messages(question, answer)), reserve=4)
        yes, no = session.score(slot)
    return 1.0 / (1.0 + math.exp(no - yes))
