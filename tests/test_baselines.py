"""The baselines reproduce hand-computed cases."""

import math

import pytest

from rpra.benchmarks.baselines import answer_confidence, as_prediction, category_prior


def _r(suite, category, passed):
    return {"suite": suite, "category": category, "label": {"pass": passed}}


TRAIN = [_r("a", "x", True)] * 3 + [_r("a", "x", False)] + [_r("a", "y", False)] * 4 + [_r("b", "z", True)] * 2


def test_the_prior_shrinks_a_category_towards_its_suite_and_the_suite_towards_all():
    prior = category_prior(TRAIN)
    overall = 5 / 10
    suite_a = (3 + 2 * overall) / (8 + 2)  # 3 of 8 passed in suite a
    assert prior({"suite": "a", "category": "x"}) == pytest.approx((3 + 2 * suite_a) / (4 + 2))
    assert prior({"suite": "a", "category": "y"}) == pytest.approx((0 + 2 * suite_a) / (4 + 2))
    assert prior({"suite": "a", "category": "new"}) == pytest.approx(suite_a)  # unseen category: the suite's rate
    assert prior({"suite": "c", "category": None}) == pytest.approx(overall)  # unseen suite: the overall rate


def test_unlabelled_records_are_ignored_and_none_at_all_is_an_error():
    assert category_prior(TRAIN + [_r("a", "x", None)] * 50)({"suite": "a", "category": "x"}) == category_prior(TRAIN)({"suite": "a", "category": "x"})
    with pytest.raises(ValueError):
        category_prior([_r("a", "x", None)])


def test_the_remote_prior_counts_the_remote_answers_and_skips_records_without_one():
    from rpra.benchmarks.collection import remote_passed

    train = [{"suite": "a", "category": "x", "exact_remote": 1.0}] * 3 + [{"suite": "a", "category": "x", "exact_remote": None}] * 5
    remote = category_prior(train + [{"suite": "b", "category": "z", "exact_remote": 0.0}], outcome=remote_passed)
    overall = 3 / 4
    assert remote({"suite": "b", "category": "z"}) == pytest.approx((0 + 2 * (0 + 2 * overall) / 3) / 3)
    both = as_prediction(0.25, predictor="category prior", p_remote=0.75)
    assert both["advantage"] == pytest.approx(-0.5) and "p_remote" not in as_prediction(0.25, predictor="p")


def test_answer_confidence_is_the_geometric_mean_token_probability():
    record = {"local_logprobs": {"mean": math.log(0.5), "min": math.log(0.1)}}
    assert answer_confidence(record) == pytest.approx(0.5) and answer_confidence(record, which="min") == pytest.approx(0.1)
    assert answer_confidence({}) is None


def test_a_baseline_prediction_is_monotone_on_the_judge_scale():
    assert as_prediction(0.0, predictor="p")["expected"] == 1 and as_prediction(1.0, predictor="p")["expected"] == 10


def test_the_self_check_prompt_ends_with_the_question_and_its_answer_after_the_shots():
    from rpra import prompts

    (message,) = prompts.self_check_messages("What is 2 + 2?", "  4\n")
    text = message["content"]
    assert text.endswith("Question: What is 2 + 2?\nProposed answer: 4\nIs the proposed answer correct?")
    assert text.count("Is the proposed answer correct? Yes") == 2 and text.count("Is the proposed answer correct? No") == 2


def test_self_verification_on_the_real_model_is_a_probability_and_repeatable(model_path):
    from rpra.benchmarks.baselines import self_verification
    from rpra.config import Settings
    from rpra.local import LocalModel

    local = LocalModel.from_settings(Settings(model=str(model_path), n_threads=1, log=False))
    first = self_verification(local, "What is 3 + 4?", "7")
    assert 0.0 < first < 1.0
    assert self_verification(local, "What is 3 + 4?", "7") == pytest.approx(first, abs=1e-6)  # the cached prefix changes nothing
    assert self_verification(local, "What is 3 + 4?", "9") != pytest.approx(first, abs=1e-6)  # it reads the answer
