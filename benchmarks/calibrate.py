"""Choose the routing threshold on the calibration split (pure; `rpra calibrate` writes it).

As in RouteLLM, the threshold comes from the predictions' quantiles: either a target share of
remote calls, or the largest local share whose local answers fail at most ``max_fail`` of the time.
Requests with a prediction below the threshold are deferred.
"""

from __future__ import annotations

import numpy as np


def threshold_for_share(pred: np.ndarray, share: float) -> float:
    """A threshold deferring ``share`` of the items (the lowest predictions), as near as ties allow."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1]; got {share}")
    ordered = np.sort(np.asarray(pred, float))
    k = int(round(share * len(ordered)))
    if k == 0:
        return float(ordered[0])
    if k == len(ordered):
        return float(np.nextafter(ordered[-1], np.inf))
    return float((ordered[k - 1] + ordered[k]) / 2) if ordered[k - 1] < ordered[k] else float(ordered[k])


def threshold_for_failure(pred: np.ndarray, passed: np.ndarray, max_fail: float) -> float:
    """The lowest threshold (most local answers) whose local answers fail at most ``max_fail``."""
    pred, passed = np.asarray(pred, float), np.asarray(passed, bool)
    for t in [*np.unique(pred), float(np.nextafter(pred.max(), np.inf))]:
        local = pred >= t
        if not local.any() or 1.0 - passed[local].mean() <= max_fail:
            return float(t)
    raise AssertionError("the last candidate answers nothing locally and always qualifies")


def describe(pred: np.ndarray, passed: np.ndarray, threshold: float) -> dict:
    """What a threshold does on these items: remote share, and the failure rate of local answers."""
    pred, passed = np.asarray(pred, float), np.asarray(passed, bool)
    local = pred >= threshold
    return {
        "threshold": threshold,
        "remote_share": float(1 - local.mean()),
        "local_fail_rate": float(1 - passed[local].mean()) if local.any() else 0.0,
        "items": int(len(pred)),
    }
