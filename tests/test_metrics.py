"""The deferral benchmark's metrics: hand-computed small cases, and oracle tests on random data."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from rpra.benchmarks import metrics as m

# The small case most tests below use. Remote scores 8 everywhere, local scores average 5: gap 3.
# Items 1 and 2 tie at pred 0.4, so they go remote together.
PRED = [0.1, 0.4, 0.4, 0.9]
LOCAL = [2.0, 6.0, 4.0, 8.0]
REMOTE = [8.0, 8.0, 8.0, 8.0]


def synthetic(n: int, seed: int):
    """Random judge scores, the remote better on average, plus a noisy router that knows something."""
    rng = np.random.default_rng(seed)
    local_q = rng.integers(1, 11, n).astype(float)
    remote_q = np.clip(local_q + rng.integers(-2, 6, n), 1, 10).astype(float)
    noisy = m.oracle_scores(local_q, remote_q) + rng.normal(0, 3, n)
    return local_q, remote_q, noisy


# --- deferral_curve, pgr, apgr, cpt: hand-computed -------------------------------------------------


def test_deferral_curve_by_hand():
    # Deferral order: item 0 (gain 8-2 = 6), then items 1 and 2 together (gains 2 and 4),
    # then item 3 (gain 0).
    # share 0:    quality 5
    # share 1/4:  5 + 6/4       = 6.5
    # share 3/4:  5 + (6+2+4)/4 = 8
    # share 1:    8 + 0/4       = 8
    curve = m.deferral_curve(PRED, LOCAL, REMOTE)
    np.testing.assert_allclose(curve["share"], [0, 0.25, 0.75, 1])
    np.testing.assert_allclose(curve["quality"], [5, 6.5, 8, 8])


def test_deferral_curve_has_a_point_per_distinct_score_plus_all_local():
    curve = m.deferral_curve([3, 1, 3, 3, 2], [1] * 5, [2] * 5)
    np.testing.assert_allclose(curve["share"], [0, 0.2, 0.4, 1.0])


def test_pgr_by_hand():
    # (6.5 - 5) / (8 - 5) = 0.5; works on a whole curve too.
    assert m.pgr(6.5, LOCAL, REMOTE) == pytest.approx(0.5)
    np.testing.assert_allclose(m.pgr(np.array([5, 6.5, 8, 8]), LOCAL, REMOTE), [0, 0.5, 1, 1])


def test_pgr_is_nan_without_a_gap():
    # Both average 5: nothing to recover.
    assert np.isnan(m.pgr(6.0, [4, 6], [6, 4]))
    # The same scores in another order average 4.18 and 4.180000000000001: still no gap.
    scores = np.array([6.7, 3.4, 1.4, 1.1, 8.3])
    assert np.isnan(m.pgr(5.0, scores, scores[::-1]))
    assert np.isnan(m.apgr([1, 2], [4, 6], [6, 4]))
    assert np.isnan(m.cpt([1, 2], [4, 6], [6, 4], 0.5))


def test_apgr_by_hand():
    # PGR 0, 0.5, 1, 1 at shares 0, 1/4, 3/4, 1. Trapezoids:
    # 1/4 * (0 + 0.5)/2 = 0.0625;  1/2 * (0.5 + 1)/2 = 0.375;  1/4 * (1 + 1)/2 = 0.25;  sum 0.6875.
    assert m.apgr(PRED, LOCAL, REMOTE) == pytest.approx(0.6875)


def test_cpt_by_hand():
    # PGR 0.5 is reached exactly at share 1/4.
    assert m.cpt(PRED, LOCAL, REMOTE, 0.5) == pytest.approx(0.25)
    # Between (1/4, 0.5) and (3/4, 1): 0.25 + (0.8 - 0.5)/0.5 * 0.5 = 0.55;  0.95 -> 0.25 + 0.9 * 0.5 = 0.7.
    assert m.cpt(PRED, LOCAL, REMOTE, 0.8) == pytest.approx(0.55)
    assert m.cpt(PRED, LOCAL, REMOTE, 0.95) == pytest.approx(0.7)


def test_cpt_is_one_when_only_all_remote_recovers_the_gap():
    # Reversed router: item 3 (gain 0) first, then 1 and 2 (gains 2 + 4), then item 0 (gain 6).
    # Quality 5, 5, 5 + 6/4 = 6.5, 8 -> PGR 0, 0, 0.5, 1 at shares 0, 1/4, 3/4, 1: PGR 1 only at share 1.
    reversed_pred = [-p for p in PRED]
    assert m.cpt(reversed_pred, LOCAL, REMOTE, 1.0) == 1.0
    assert m.cpt(PRED, LOCAL, REMOTE, 1.0) == pytest.approx(0.75)  # the right router gets there at 3/4


def test_cpt_refuses_a_target_outside_zero_one():
    with pytest.raises(ValueError, match="outside"):
        m.cpt(PRED, LOCAL, REMOTE, 95)


def test_tied_scores_are_deferred_together():
    # Both items score 0. Split in array order, item 0 (gain 8) would go first: PGR 0, 1, 1 -> APGR 0.75;
    # split the other way (gain 0 first): PGR 0, 0, 1 -> 0.25. Together: PGR 0, 1 -> 0.5, their mean.
    curve = m.deferral_curve([0, 0], [1, 5], [9, 5])
    np.testing.assert_allclose(curve["share"], [0, 1])
    assert m.apgr([0, 0], [1, 5], [9, 5]) == 0.5
    assert m.apgr([0, 1], [1, 5], [9, 5]) == pytest.approx(0.75)
    assert m.apgr([1, 0], [1, 5], [9, 5]) == pytest.approx(0.25)
    assert m.cpt([0, 0], [1, 5], [9, 5], 0.8) == pytest.approx(0.8)  # on the straight line


# --- Oracle tests ----------------------------------------------------------------------------------


def test_constant_predictor_has_apgr_exactly_one_half():
    local_q, remote_q, _ = synthetic(300, seed=1)
    assert m.apgr(np.full(300, 7.0), local_q, remote_q) == 0.5
    # Judge scores averaged over several judgments are fractional, and summing them rounds;
    # the curve's ends are still exactly the two means, so PGR is exactly 0 and 1 there.
    rng = np.random.default_rng(0)
    local_q, remote_q = np.round(rng.uniform(1, 10, 300), 2), np.round(rng.uniform(2, 10, 300), 2)
    assert m.apgr(np.full(300, 7.0), local_q, remote_q) == 0.5
    assert m.cpt(np.full(300, 7.0), local_q, remote_q, 1.0) == 1.0


def test_random_router_averages_apgr_one_half():
    local_q, remote_q, _ = synthetic(300, seed=2)
    scores = [m.apgr(m.random_scores(300, seed), local_q, remote_q) for seed in range(200)]
    assert np.mean(scores) == pytest.approx(0.5, abs=0.03)


def test_oracle_beats_every_other_router():
    for seed in range(5):
        local_q, remote_q, noisy = synthetic(200, seed)
        oracle = m.apgr(m.oracle_scores(local_q, remote_q), local_q, remote_q)
        others = [noisy, local_q, -remote_q, np.zeros(200), *(m.random_scores(200, s) for s in range(10))]
        assert oracle > 0.5
        for pred in others:
            assert oracle >= m.apgr(pred, local_q, remote_q)


def test_oracle_curve_lies_on_or_above_every_router_curve():
    local_q, remote_q, noisy = synthetic(200, seed=3)
    oracle = m.deferral_curve(m.oracle_scores(local_q, remote_q), local_q, remote_q)
    for pred in (noisy, local_q, m.random_scores(200, 0)):
        curve = m.deferral_curve(pred, local_q, remote_q)
        above = np.interp(curve["share"], oracle["share"], oracle["quality"])
        assert (above >= curve["quality"] - 1e-12).all()


def test_perfect_predictor_reproduces_the_oracle_curve():
    local_q, remote_q, _ = synthetic(200, seed=4)
    oracle = m.deferral_curve(m.oracle_scores(local_q, remote_q), local_q, remote_q)
    # Any increasing transform of the remote's loss is the same router.
    perfect = m.deferral_curve(3 * (local_q - remote_q) + 7, local_q, remote_q)
    np.testing.assert_allclose(perfect["share"], oracle["share"])
    np.testing.assert_allclose(perfect["quality"], oracle["quality"])
    # With a constant remote, knowing the local judge score exactly is knowing everything.
    const_remote = np.full(200, 9.0)
    oracle = m.deferral_curve(m.oracle_scores(local_q, const_remote), local_q, const_remote)
    perfect = m.deferral_curve(local_q, local_q, const_remote)
    np.testing.assert_allclose(perfect["share"], oracle["share"])
    np.testing.assert_allclose(perfect["quality"], oracle["quality"])


def test_oracle_needs_fewer_remote_calls_than_random():
    local_q, remote_q, _ = synthetic(300, seed=5)
    oracle = m.oracle_scores(local_q, remote_q)
    for target in (0.5, 0.8, 0.95):
        for seed in range(5):
            random = m.random_scores(300, seed)
            assert m.cpt(oracle, local_q, remote_q, target) <= m.cpt(random, local_q, remote_q, target)


def test_oracle_and_random_scores():
    np.testing.assert_allclose(m.oracle_scores([2, 6], [8, 5]), [-6, 1])  # item 0 gains most: deferred first
    np.testing.assert_array_equal(m.random_scores(5, 3), m.random_scores(5, 3))
    assert not np.array_equal(m.random_scores(5, 3), m.random_scores(5, 4))
    assert m.random_scores(5, 3).shape == (5,)


# --- Predictor quality -----------------------------------------------------------------------------


def test_auroc_by_hand_with_a_tie():
    # Average ranks of [0.2, 0.6, 0.6, 0.9]: 1, 2.5, 2.5, 4. Passing items hold 2.5 + 4 = 6.5.
    # U = 6.5 - 2*3/2 = 3.5 over 2*2 pairs -> 0.875 (pairs: 1 + 0.5 tie + 1 + 1).
    assert m.auroc([0.2, 0.6, 0.6, 0.9], [False, False, True, True]) == pytest.approx(0.875)


def test_auroc_of_perfect_reversed_and_constant_predictors():
    passed = np.array([0, 0, 1, 0, 1, 1], dtype=bool)
    assert m.auroc(passed * 1.0, passed) == 1.0
    assert m.auroc(-1.0 * passed, passed) == 0.0
    assert m.auroc(np.ones(6), passed) == 0.5
    assert np.isnan(m.auroc([1, 2, 3], [True, True, True]))


def test_auroc_refuses_scores_as_labels():
    with pytest.raises(ValueError, match="True/False"):
        m.auroc([1, 2], [7.0, 3.0])


def test_spearman_by_hand():
    # No ties: d = 0, 1, 1, 0 -> 1 - 6*2/(4*15) = 0.8.
    assert m.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # Ties: ranks 1, 2.5, 2.5, 4 vs 1..4; centred dot 4.5, norms^2 4.5 and 5 -> sqrt(4.5/5) = sqrt(0.9).
    assert m.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.sqrt(0.9))


def test_spearman_of_a_monotone_transform_is_one():
    a = np.random.default_rng(0).normal(size=50)
    assert m.spearman(a, np.exp(3 * a)) == pytest.approx(1.0)
    assert m.spearman(a, -(a**3)) == pytest.approx(-1.0)
    assert np.isnan(m.spearman(a, np.ones(50)))


def test_exact_and_within_one_accuracy_by_hand():
    # (7, 7) exact; (5, 6) off by one; (3, 1) off by two; (10, 10) exact.
    assert m.exact_accuracy([7, 5, 3, 10], [7, 6, 1, 10]) == 0.5
    assert m.within_one_accuracy([7, 5, 3, 10], [7, 6, 1, 10]) == 0.75


def test_ece_by_hand():
    # Bin [0.1, 0.2): two at 0.15, none pass -> |0.15 - 0| weighted 2/6 = 0.05.
    # Bin [0.8, 0.9): four at 0.85, three pass -> |0.85 - 0.75| weighted 4/6 = 0.0667.  Sum 7/60.
    p = [0.15, 0.15, 0.85, 0.85, 0.85, 0.85]
    assert m.ece(p, [0, 0, 1, 1, 1, 0]) == pytest.approx(7 / 60)


def test_ece_bins_are_half_open_tenths():
    # 0.12 and 0.18 share bin [0.1, 0.2): confidence 0.15, pass rate 0.5 -> 0.35.
    # (Bins centred on the tenths would split them: (0.88 + 0.18) / 2 = 0.53.)
    assert m.ece([0.12, 0.18], [True, False]) == pytest.approx(0.35)


def test_ece_puts_one_in_the_last_bin():
    # 0.95 and 1.0 share bin [0.9, 1.0]: confidence 0.975, both pass -> 0.025.
    assert m.ece([1.0, 0.95], [True, True]) == pytest.approx(0.025)


def test_ece_of_perfectly_calibrated_bins_is_zero():
    p = [0.25] * 4 + [0.75] * 4
    passed = [1, 0, 0, 0] + [1, 1, 1, 0]
    assert m.ece(p, passed) == pytest.approx(0.0, abs=1e-12)
    assert m.ece(p, [0] * 8) > 0


def test_brier_by_hand():
    # ((0.8 - 1)^2 + (0.3 - 0)^2) / 2 = (0.04 + 0.09) / 2 = 0.065.
    assert m.brier([0.8, 0.3], [True, False]) == pytest.approx(0.065)


# --- Risk and coverage ----------------------------------------------------------------------------


def test_risk_coverage_by_hand_with_a_tie():
    # Answered locally first: item 0 (pass), then 1 and 2 together (pass, fail), then item 3 (fail).
    # coverage 1/4: 0 failures / 1;  3/4: 1 / 3;  1: 2 / 4.
    curve = m.risk_coverage([0.9, 0.7, 0.7, 0.2], [1, 1, 0, 0])
    np.testing.assert_allclose(curve["coverage"], [0.25, 0.75, 1.0])
    np.testing.assert_allclose(curve["risk"], [0, 1 / 3, 0.5])


def test_aurc_by_hand_with_a_tie():
    # Expected failures among the first k: 0, 0.5 (half the tied pair), 1, 2 -> risks 0, 1/4, 1/3, 1/2.
    # Mean: (0 + 1/4 + 1/3 + 1/2) / 4 = 13/48. Splitting the tie either way gives 10/48 or 16/48;
    # 13/48 is their mean.
    assert m.aurc([0.9, 0.7, 0.7, 0.2], [1, 1, 0, 0]) == pytest.approx(13 / 48)
    assert m.aurc([0.9, 0.8, 0.7, 0.2], [1, 1, 0, 0]) == pytest.approx(10 / 48)
    assert m.aurc([0.9, 0.7, 0.8, 0.2], [1, 1, 0, 0]) == pytest.approx(16 / 48)


def test_aurc_of_a_constant_predictor_is_the_failure_rate():
    passed = np.random.default_rng(0).random(100) < 0.7
    assert m.aurc(np.zeros(100), passed) == pytest.approx(1 - passed.mean())
    assert m.aurc(passed * 1.0, passed) < m.aurc(np.zeros(100), passed) < m.aurc(-1.0 * passed, passed)


# --- Bootstrap ------------------------------------------------------------------------------------


def test_bootstrap_contains_the_point_and_narrows_with_more_data():
    widths = []
    for n in (100, 1000):
        local_q, remote_q, noisy = synthetic(n, seed=6)
        point, lower, upper = m.bootstrap(m.apgr, noisy, local_q, remote_q, n_boot=200)
        assert point == m.apgr(noisy, local_q, remote_q)
        assert lower < point < upper
        widths.append(upper - lower)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(10) in theory


def test_bootstrap_is_deterministic_given_the_seed():
    local_q, remote_q, noisy = synthetic(50, seed=7)
    run = partial(m.bootstrap, partial(m.cpt, target=0.8), noisy, local_q, remote_q, n_boot=50)
    assert run(seed=1) == run(seed=1)
    assert run(seed=1) != run(seed=2)


def test_bootstrap_of_a_constant_metric_has_no_width():
    assert m.bootstrap(m.brier, [0.5, 0.5, 0.5], [1, 0, 1], n_boot=50)[0] == pytest.approx(0.25)
    assert m.bootstrap(m.brier, [0.5, 0.5, 0.5], [1, 0, 1], n_boot=50) == pytest.approx((0.25, 0.25, 0.25))


def test_bootstrap_skips_nan_resamples():
    # With one failure among six, about a third of resamples hold no failure and AUROC is NaN there.
    point, lower, upper = m.bootstrap(m.auroc, [1, 2, 3, 4, 5, 6], [0, 1, 1, 1, 1, 1], n_boot=100)
    assert point == 1.0 and lower == 1.0 and upper == 1.0
    # Every resample NaN: the bounds are NaN too, not an error.
    point, lower, upper = m.bootstrap(m.auroc, [1, 2], [1, 1], n_boot=10)
    assert np.isnan(point) and np.isnan(lower) and np.isnan(upper)


def test_metrics_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        m.apgr([1, 2, 3], [1, 2], [3, 4])
