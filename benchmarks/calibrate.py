"""Choose the routing threshold on the calibration split (pure; `rpra calibrate` writes it).

As in RouteLLM, the threshold comes from the predictions' quantiles: either a target share of
remote calls, or the largest local share whose local answers fail at most ``max_fail`` of the time.
Requests with a prediction below the threshold are deferred.
"""

from __future__ import annotations

import numpy as np

from rpra.controller import defers, routed_score


def threshold_for_share(pred: np.ndarray, share: float) -> float:
    """A threshold deferring ``share`` of the items (the lowest predictions), as near as ties allow."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1]; got {share}")
    ordered = np.sort(np.asarray(pred, float))
    k = int(round(share * len(ordered)))
    if k == 0:
        return float(ordered[0])
    if k == len(ordered):
        return float(np.nextafter(ordered[-1], np.inf))  # the smallest value that defers every item
    return float((ordered[k - 1] + ordered[k]) / 2) if ordered[k - 1] < ordered[k] else float(ordered[k])


def threshold_for_failure(pred: np.ndarray, passed: np.ndarray, max_fail: float) -> float:
    """The lowest threshold (most local answers) whose local answers fail at most ``max_fail``."""
    pred, passed = np.asarray(pred, float), np.asarray(passed, bool)
    for t in [*np.unique(pred), float(np.nextafter(pred.max(), np.inf))]:
        local = ~defers(pred, t)
        if not local.any() or 1.0 - passed[local].mean() <= max_fail:
            return float(t)
    raise AssertionError("the last candidate answers nothing locally and always qualifies")


def describe(pred: np.ndarray, passed: np.ndarray, threshold: float) -> dict:
    """What a threshold does on these items: remote share, and the failure rate of local answers."""
    pred, passed = np.asarray(pred, float), np.asarray(passed, bool)
    local = ~defers(pred, threshold)
    return {
        "threshold": threshold,
        "remote_share": float(1 - local.mean()),
        "local_fail_rate": float(1 - passed[local].mean()) if local.any() else 0.0,
        "items": int(len(pred)),
    }


def calibrate(records: list[dict], *, protocol: str, route_on: str, pass_mark: int, target_share: float | None = None,
              max_fail: float | None = None) -> dict:  # fmt: skip
    """The threshold for collected calibration ``records`` and what it does on them (``describe``).

    Exactly one of ``target_share`` (the share to defer) and ``max_fail`` (the largest share of
    failing local answers) is given. Predictions are the records' ``protocol`` field (the collected
    "pa" / "rpra", or another predictor's, ``bench.add_configured_predictions``), routed on
    ``route_on`` as the controller does; a failure limit needs judged local answers, so records
    without a judge score are left out for it.
    """
    if (target_share is None) == (max_fail is None):
        raise ValueError("Give exactly one of target_share or max_fail.")
    if max_fail is not None:
        records = [r for r in records if r["judge_local"]["score"] is not None]
    if not records:
        raise ValueError("No calibration records with a judged local answer: check the judge (--judge-url, --judge-grammar).")
    pred = np.array([routed_score(r[protocol], route_on) for r in records])
    passed = np.array([r["judge_local"]["score"] is not None and r["judge_local"]["score"] >= pass_mark for r in records])
    t = threshold_for_share(pred, target_share) if target_share is not None else threshold_for_failure(pred, passed, max_fail)
    if route_on in ("p_pass", "advantage"):
        t = min(t, 1.0)  # a probability (difference): "defer everything" stops short of 1 exactly
    return describe(pred, passed, round(t, 4))
