from dataclasses import replace

import numpy as np
import pytest

from rpra.benchmarks.calibrate import describe, threshold_for_failure, threshold_for_share

PRED = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
PASSED = np.array([0, 0, 1, 0, 1, 1, 0, 1, 1, 1], bool)


def test_share_threshold_defers_exactly_that_share():
    for share in (0.0, 0.3, 0.5, 1.0):
        t = threshold_for_share(PRED, share)
        assert (PRED < t).mean() == pytest.approx(share)


def test_share_threshold_on_ties_cannot_split_them():
    pred = np.array([1.0, 2.0, 2.0, 2.0, 3.0])
    t = threshold_for_share(pred, 0.4)  # would need to split the 2.0s
    assert (pred < t).mean() in (0.2, 0.8)


def test_failure_threshold_picks_the_most_local_answers_within_the_limit():
    # Answering locally from pred >= 3: locals are items 3..10 with passes 1,0,1,1,0,1,1,1 -> fail 2/8 = 25%.
    # From pred >= 5: passes 1,1,0,1,1,1 -> fail 1/6 = 16.7%. From >= 8: fail 0.
    assert threshold_for_failure(PRED, PASSED, 0.25) == 3.0
    assert threshold_for_failure(PRED, PASSED, 0.20) == 5.0
    assert threshold_for_failure(PRED, PASSED, 0.0) == 8.0
    d = describe(PRED, PASSED, 5.0)
    assert d["remote_share"] == pytest.approx(0.4) and d["local_fail_rate"] == pytest.approx(1 / 6)


@pytest.mark.slow
def test_the_threshold_is_chosen_on_the_configured_predictors_own_predictions(greedy_settings, model_path, isolated_home, tmp_path):
    """`rpra calibrate` with predictor = probe: the probe's P(pass) is thresholded, not the
    collected zero-shot one (whose scale and spread differ)."""
    from rpra.benchmarks.bench import add_configured_predictions
    from rpra.benchmarks.calibrate import calibrate
    from rpra.local import LocalModel
    from rpra.training.probe import fit_logistic, slot_states

    settings = greedy_settings(model=str(model_path), protocol="pa", route_on="p_pass", threshold=0.5)
    prompts_ = [f"What is {a} + {a}?" for a in range(1, 5)] + [f"What is {a}7 * {a}9 - 3{a}1?" for a in range(1, 5)]
    local = LocalModel(model_path, name="smollm2-135m-instruct", n_ctx=1024, n_threads=2, seed=0)
    probe, _ = fit_logistic(slot_states(local, prompts_, settings), np.array([1] * 4 + [0] * 4), folds=2)
    path = probe.save(tmp_path / "p.probe.npz")
    zero_shot = {"p_pass": 0.5, "expected": 5.0, "predictor": "zero-shot"}
    records = [{"id": str(i), "prompt": p, "pa": zero_shot, "judge_local": {"score": 8 if i < 4 else 2}} for i, p in enumerate(prompts_)]
    assert add_configured_predictions(records, settings) == "pa"  # zero-shot: the collected prediction
    field = add_configured_predictions(records, replace(settings, predictor="probe", probe=str(path)))
    assert field == "configured" and all(r["configured"]["predictor"] == "probe" for r in records)
    chosen = calibrate(records, protocol=field, route_on="p_pass", pass_mark=7, target_share=0.5)
    assert chosen["remote_share"] == 0.5 and chosen["local_fail_rate"] == 0.0  # the probe separates the two halves
    assert calibrate(records, protocol="pa", route_on="p_pass", pass_mark=7, target_share=0.5)["remote_share"] in (0.0, 1.0)  # ties
