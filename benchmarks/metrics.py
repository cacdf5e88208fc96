"""Metrics of the deferral benchmark: pure functions over numpy arrays, one value per item.

Conventions shared by every function:

- ``pred`` is a router's score, HIGHER meaning "the local answer will be good". A threshold
  defers the items scored below it, so the lowest scores go remote first.
- ``local_q`` and ``remote_q`` are judge scores (1..10) of the local and remote answers;
  ``passed`` says the local answer passes (for example ``local_q >= pass_mark``).
- Ties in ``pred`` move together: no threshold separates two items with the same score, so a
  curve has one point per distinct score, never one per item. Between two points we draw a
  straight line, which is exactly the expected value of breaking the tie at random (deferring
  j of a tied group's g items at random adds j/g of the group's total gain, in expectation).
  Without this, an arbitrary tie order (array order, say) would leak into every number, and a
  router that outputs few distinct values (scores 1..10) would be judged by luck.

The deferral curve and its summaries follow RouteLLM (Ong et al., 2024): PGR, APGR and CPT.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _floats(*arrays) -> list[np.ndarray]:
    """The arrays as 1-D float arrays of one common, non-zero length, every value finite."""
    out = [np.asarray(a, dtype=float) for a in arrays]
    lengths = [a.shape[0] if a.ndim == 1 else None for a in out]
    if None in lengths:
        raise ValueError("metrics take 1-D arrays with one value per item; flatten the inputs first")
    if len(set(lengths)) != 1:
        raise ValueError(f"arrays differ in length {lengths}; pass one value per item to each")
    if lengths[0] == 0:
        raise ValueError("no items to score; run the benchmark on at least one item")
    if not all(np.isfinite(a).all() for a in out):
        raise ValueError("inputs contain NaN or infinity; drop or fix those items before scoring")
    return out


def _bools(a: np.ndarray) -> np.ndarray:
    """``a`` as a bool array, refusing anything but 0/1 (a judge score passed by mistake)."""
    if not np.isin(a, (0, 1)).all():
        raise ValueError("`passed` must hold only True/False (or 1/0); threshold the scores first")
    return a.astype(bool)


def _group_ends(sorted_values: np.ndarray) -> np.ndarray:
    """End index (exclusive) of each run of equal values in a sorted array."""
    change = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    return np.append(change, len(sorted_values))


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


# --- The deferral curve (RouteLLM) ----------------------------------------------------------------


def deferral_curve(pred, local_q, remote_q) -> dict[str, np.ndarray]:
    """Mean quality against the share of remote calls, deferring the lowest ``pred`` first.

    Returns ``{"share": ..., "quality": ...}``: one point at share 0 (all local), one after each
    group of tied scores goes remote, the last at share 1 (all remote).
    """
    pred, local_q, remote_q = _floats(pred, local_q, remote_q)
    n = len(pred)
    order = np.argsort(pred, kind="stable")
    ends = _group_ends(pred[order])
    gain = np.cumsum((remote_q - local_q)[order])[ends - 1]
    share = np.concatenate([[0.0], ends / n])
    quality = np.concatenate([[0.0], gain / n]) + local_q.mean()
    # Pin the ends to the exact means, so PGR is exactly 0 and 1 there despite rounding in cumsum.
    quality[0], quality[-1] = local_q.mean(), remote_q.mean()
    return {"share": share, "quality": quality}


def pgr(quality, local_q, remote_q):
    """Performance gap recovered: (quality - mean local) / (mean remote - mean local).

    ``quality`` may be a number or an array (a curve's qualities). When the two models score the
    same on average there is no gap to recover and the result is NaN. When the remote is worse on
    average the sign flips with the gap, so PGR still reads "1 = all-remote quality".
    """
    local_q, remote_q = _floats(local_q, remote_q)
    m_local, m_remote = local_q.mean(), remote_q.mean()
    gap = m_remote - m_local
    if np.isclose(m_remote, m_local, rtol=1e-12, atol=1e-12):
        return np.full_like(np.asarray(quality, dtype=float), np.nan)[()]
    return ((np.asarray(quality, dtype=float) - m_local) / gap)[()]


def apgr(pred, local_q, remote_q) -> float:
    """Average PGR: the area under PGR against the remote share, from share 0 to 1.

    A random router scores 0.5 in expectation, and a constant one exactly 0.5 (its curve is the
    straight line from (0, 0) to (1, 1)); the oracle scores the most. NaN when there is no gap.
    """
    curve = deferral_curve(pred, local_q, remote_q)
    return curve_apgr(curve["share"], curve["quality"], local_q, remote_q)


def cpt(pred, local_q, remote_q, target: float) -> float:
    """Call-performance threshold: the smallest remote share at which PGR reaches ``target``.

    Between two curve points the share is interpolated linearly, the same straight line APGR
    integrates (a share between points is reached by deferring part of the next tied group at
    random, or by randomising the threshold). PGR is 1 at share 1 by definition, so a target in
    [0, 1] is always reached, at 1.0 at the latest. NaN when there is no gap.
    """
    curve = deferral_curve(pred, local_q, remote_q)
    return curve_cpt(curve["share"], curve["quality"], local_q, remote_q, target)


def policy_curve(share, quality, local_q, remote_q) -> dict[str, np.ndarray]:
    """Any policy's operating points (remote share, mean quality), as a curve from share 0 to 1:
    sorted by share, the best quality kept where shares tie, and the ends added where missing
    (share 0: every request answered by the device as is; share 1: every one deferred), so
    that a policy that is no ranking (a threshold sweep of a ladder, a price sweep of an
    allocation) gets APGR and CPT as a router does."""
    share, quality = _floats(share, quality)
    local_q, remote_q = _floats(local_q, remote_q)
    best: dict[float, float] = {}
    for s, q in zip(share.tolist(), quality.tolist()):
        best[s] = max(q, best.get(s, -np.inf))
    best.setdefault(0.0, float(local_q.mean()))
    best.setdefault(1.0, float(remote_q.mean()))
    xs = np.array(sorted(best))
    return {"share": xs, "quality": np.array([best[x] for x in xs])}


def curve_apgr(share, quality, local_q, remote_q) -> float:
    """APGR of a curve's points (``deferral_curve``'s, or ``policy_curve``'s)."""
    return _trapezoid(np.asarray(share, float), pgr(np.asarray(quality, float), local_q, remote_q))


def curve_cpt(share, quality, local_q, remote_q, target: float) -> float:
    """CPT of a curve's points: the smallest share at which PGR reaches ``target`` (``cpt``)."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target PGR {target} is outside [0, 1]; use e.g. 0.5, 0.8 or 0.95")
    share, gap_recovered = np.asarray(share, float), pgr(np.asarray(quality, float), local_q, remote_q)
    if np.isnan(gap_recovered).any():
        return float("nan")
    i = int(np.argmax(gap_recovered >= target))  # the first point at or past the target
    if i == 0:
        return 0.0
    p0, p1 = gap_recovered[i - 1], gap_recovered[i]
    return float(share[i - 1] + (target - p0) / (p1 - p0) * (share[i] - share[i - 1]))


def oracle_scores(local_q, remote_q) -> np.ndarray:
    """The oracle router's scores: the items where the remote gains most go remote first.

    Its curve lies on or above every router's when the remote is better on average.
    """
    local_q, remote_q = _floats(local_q, remote_q)
    return local_q - remote_q


def random_scores(n: int, seed: int) -> np.ndarray:
    """A random router's scores for ``n`` items, reproducible from ``seed``."""
    return np.random.default_rng(seed).random(n)


# --- How well the predictor predicts --------------------------------------------------------------


def auroc(pred, passed) -> float:
    """Area under the ROC curve of ``pred`` separating passing from failing local answers.

    Rank-based (the Mann-Whitney U statistic over n_pass * n_fail pairs), tied scores counting
    half. NaN when every answer passes or every answer fails.
    """
    pred, passed = _floats(pred, passed)
    positive = _bools(passed)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = _average_ranks(pred)[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's correlation of average ranks. NaN if either is constant."""
    a, b = _floats(a, b)
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    if denom == 0:
        return float("nan")
    return float(np.clip((ra * rb).sum() / denom, -1.0, 1.0))


def exact_accuracy(pred_label, judged) -> float:
    """Share of items whose predicted score (its mode, 1..10) equals the judged score."""
    pred_label, judged = _floats(pred_label, judged)
    return float(np.mean(pred_label == judged))


def within_one_accuracy(pred_label, judged) -> float:
    """Share of items whose predicted score is within one point of the judged score."""
    pred_label, judged = _floats(pred_label, judged)
    return float(np.mean(np.abs(pred_label - judged) <= 1))


def ece(p_pass, passed, bins: int = 10) -> float:
    """Expected calibration error of P(pass): equal-width bins, each weighted by its item count.

    Bin i holds [i/bins, (i+1)/bins); the last also holds 1.0. Per bin, |mean P(pass) - pass rate|.
    """
    p_pass, passed = _floats(p_pass, passed)
    passed = _bools(passed)
    if ((p_pass < 0) | (p_pass > 1)).any():
        raise ValueError("P(pass) must lie in [0, 1]; pass probabilities, not scores")
    idx = np.minimum((p_pass * bins).astype(int), bins - 1)
    # count/n * |sum p/count - sum y/count| = |sum p - sum y| / n, summed over the bins.
    confidence = np.bincount(idx, weights=p_pass, minlength=bins)
    hits = np.bincount(idx, weights=passed.astype(float), minlength=bins)
    return float(np.abs(confidence - hits).sum() / len(p_pass))


def brier(p_pass, passed) -> float:
    """Brier score of P(pass): the mean squared error against the 0/1 outcome."""
    p_pass, passed = _floats(p_pass, passed)
    return float(np.mean((p_pass - _bools(passed)) ** 2))


# --- Selective answering: risk against coverage ---------------------------------------------------


def risk_coverage(pred, passed) -> dict[str, np.ndarray]:
    """The failure rate among the items answered locally, answering the highest ``pred`` first.

    Returns ``{"coverage": ..., "risk": ...}``: one point per group of tied scores, coverage k/n
    and risk = failures among those k / k, ending at coverage 1. (Coverage 0 has no risk.)
    """
    pred, passed = _floats(pred, passed)
    failed = ~_bools(passed)
    order = np.argsort(-pred, kind="stable")
    ends = _group_ends(pred[order])
    failures = np.cumsum(failed[order])[ends - 1]
    return {"coverage": ends / len(pred), "risk": failures / ends}


def aurc(pred, passed) -> float:
    """Area under the risk-coverage curve: the mean risk over coverages 1/n, 2/n, ..., 1.

    This is the usual selective-prediction AURC (the mean of the n selective risks). Inside a
    tied group each risk is its expectation under random tie-breaking; that is not the straight
    line between curve points (risk is a ratio), so we compute it item by item. A constant
    predictor scores the overall failure rate; lower is better.
    """
    pred, passed = _floats(pred, passed)
    failed = (~_bools(passed)).astype(float)
    order = np.argsort(-pred, kind="stable")
    ends = _group_ends(pred[order])
    sizes = np.diff(np.concatenate([[0], ends]))
    group_rate = np.add.reduceat(failed[order], ends - sizes) / sizes
    # The expected failures among the first k items: each item counts its group's failure rate.
    expected_failures = np.cumsum(np.repeat(group_rate, sizes))
    return float(np.mean(expected_failures / np.arange(1, len(pred) + 1)))


# --- Uncertainty ----------------------------------------------------------------------------------


def bootstrap(
    metric: Callable[..., float], *arrays, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(point estimate, lower, upper): a percentile bootstrap interval at level 1 - ``alpha``.

    Each resample draws n items with replacement, the same items from every array, and scores
    ``metric(*resampled)``. Resamples where the metric is NaN (one class only, no gap) are
    skipped; if all are, the bounds are NaN. Deterministic given ``seed``.
    """
    arrays = [np.asarray(a) for a in arrays]
    if not arrays or len({len(a) for a in arrays}) != 1 or len(arrays[0]) == 0:
        raise ValueError(
            "bootstrap needs at least one non-empty array, all of one length (one value per item)"
        )
    point = float(metric(*arrays))
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        value = float(metric(*(a[idx] for a in arrays)))
        if not np.isnan(value):
            values.append(value)
    if not values:
        return point, float("nan"), float("nan")
    lower, upper = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lower), float(upper)
