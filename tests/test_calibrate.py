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
