"""Policies that are no ranking, on the same test items as the routers: the test-time compute ladder.

A router ranks requests and defers the lowest; its curve is one threshold sweep. The ladder
also changes what the device answers (best-of-N keeps a better draft), and spends device time
to do it, so each policy here is a set of operating points, each with its remote share, its
mean quality and its device seconds per request:

- **PA threshold routing** (the pre-answer probe): a deferred request costs the decision, a
  kept one the decision and the draft.
- **The cascade** (probe, then the draft verifier): ``controller.cascade_scores``.
- **The ladder** (the runtime's with ``best_of`` and ``verify_threshold`` unset, so one threshold
  serves every point): the probe defers a request under the threshold at once; the device drafts
  the rest; the verifier keeps a draft it scores at or above the threshold; a doubted draft
  climbs to best-of-N (weighted, ``rpra.ladder.choose``), kept if its pick clears the threshold,
  else deferred. Swept over the threshold.
- **The allocation** (Snell et al. 2024): on the calibration split (train items; never the test
  items), ``rpra.ladder.allocate`` gives each difficulty bin of the pre-answer P(pass) the action
  (answer, best-of-N, revise, defer) with the best mean quality minus its price: device seconds
  at ``LOCAL_PRICE`` and a remote call at a price swept over ``REMOTE_PRICES``; each price's
  policy is then run on the test items. The operating point reported is the one the calibration
  split picks: the lowest remote price whose calibration remote share is at most ``TARGET_SHARE``.

Every curve gets APGR and CPT as a router's does (``metrics.policy_curve``), and the table
compares the policies at equal remote share and at equal quality.
"""

from __future__ import annotations

import numpy as np

from rpra.benchmarks import metrics as M
from rpra.controller import cascade_scores, defers
from rpra.ladder import allocate, policy_action

# Set before any test run, not tuned on one.
LOCAL_PRICE = 0.05  # quality points (exact: 1 or 10) a second of device time costs in the allocation
REMOTE_PRICES = tuple(float(p) for p in np.round(np.arange(0.0, 9.01, 0.25), 2))  # a remote call's price, swept
BINS = 4  # the allocation's difficulty bins (quantiles of the calibration split's pre-answer P(pass))
TARGET_SHARE = 0.4  # the remote budget: the allocation's operating point keeps under it on calibration
SHARES = (0.2, 0.4)  # the table's "quality at equal remote share" columns
QUALITY_OF_REMOTE = 0.9  # the table's "remote share at equal quality": this share of always-remote quality

LADDER = "ladder: draft, best-of-{n} if doubted, then defer"
ALLOCATION = "ladder: allocation by difficulty (train-calibrated)"


def ranked_points(pred: np.ndarray, local_q: np.ndarray, remote_q: np.ndarray, kept_s: np.ndarray, deferred_s: np.ndarray) -> dict:
    """A ranking's operating points with their device seconds: the lowest ``pred`` deferred
    first, one point per request deferred (ties in the given order)."""
    order = np.argsort(pred, kind="stable")
    n = len(pred)
    steps = np.concatenate([[0.0], np.cumsum((remote_q - local_q)[order])]) / n
    seconds = np.concatenate([[0.0], np.cumsum((deferred_s - kept_s)[order])]) / n
    return {"share": np.arange(n + 1) / n, "quality": local_q.mean() + steps, "local_s": kept_s.mean() + seconds}


def ladder_outcome(threshold: float, first: np.ndarray, L: dict[str, np.ndarray], remote_q: np.ndarray) -> dict[str, np.ndarray]:
    """Per request at one ``threshold`` for all three points (the runtime's default, ``verify_threshold``
    unset): whether it was drafted, climbed to best-of-N and deferred, the quality the user got and
    the device seconds spent. ``first``: the probe's P(pass); ``L``: per request ``greedy_q`` /
    ``kept_q`` (the quality of the greedy draft / of best-of-N's pick), their scores
    (``greedy_score``, ``kept_score``) and seconds (``decide_s``, ``draft_s``, ``best_s``)."""
    drafted = ~defers(first, threshold)
    keep_greedy = drafted & ~defers(L["greedy_score"], threshold)
    climbed = drafted & defers(L["greedy_score"], threshold)
    keep_best = climbed & ~defers(L["kept_score"], threshold)
    return {"drafted": drafted, "climbed": climbed, "deferred": ~(keep_greedy | keep_best),
            "quality": np.where(keep_greedy, L["greedy_q"], np.where(keep_best, L["kept_q"], remote_q)),
            "local_s": np.where(drafted, L["draft_s"], L["decide_s"]) + np.where(climbed, L["best_s"], 0.0)}  # fmt: skip


def ladder_points(L: dict[str, np.ndarray], first: np.ndarray, remote_q: np.ndarray, thresholds: np.ndarray) -> dict:
    """The ladder's operating points over ``thresholds`` (``ladder_outcome``'s means)."""
    outcomes = [ladder_outcome(t, first, L, remote_q) for t in thresholds]
    return {"share": np.array([o["deferred"].mean() for o in outcomes]), "quality": np.array([o["quality"].mean() for o in outcomes]),
            "local_s": np.array([o["local_s"].mean() for o in outcomes]), "threshold": np.asarray(thresholds)}  # fmt: skip


def allocation_policy(calibration: dict, price: float) -> tuple[list[float], list[str], float]:
    """``rpra.ladder.allocate`` on the calibration split at one remote ``price``: the bin edges,
    each bin's action, and the calibration split's remote share under it."""
    seconds = {a: float(np.mean(v)) for a, v in calibration["seconds"].items()}
    costs = {a: LOCAL_PRICE * seconds[a] + (price if a == "defer" else 0.0) for a in calibration["outcomes"]}
    edges, actions = allocate(calibration["p_pass"], calibration["outcomes"], costs, bins=BINS, price=1.0)
    share = float(np.mean([policy_action(p, edges, actions) == "defer" for p in calibration["p_pass"]]))
    return edges, actions, share


def within_share(sweep: list[dict], share: float = TARGET_SHARE) -> dict:
    """The operating point of a price sweep (ascending prices) the calibration split picks: the
    lowest price whose calibration share deferred is at most ``share`` (else the dearest)."""
    return next((p for p in sweep if p["calibration_share"] <= share + 1e-9), sweep[-1])


def allocation_outcome(p_pass: np.ndarray, edges: list[float], actions: list[str], outcomes: dict[str, np.ndarray],
                       seconds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Per test request under an allocation: (deferred, quality, device seconds)."""
    chosen = np.array([policy_action(p, edges, actions) for p in p_pass])
    quality = np.select([chosen == a for a in outcomes], [outcomes[a] for a in outcomes])
    local_s = np.select([chosen == a for a in seconds], [seconds[a] for a in seconds])
    return chosen == "defer", quality, local_s


def _curve_metrics(points: dict, local_q: np.ndarray, remote_q: np.ndarray) -> dict:
    curve = M.policy_curve(points["share"], points["quality"], local_q, remote_q)
    return {"apgr": {"value": M.curve_apgr(curve["share"], curve["quality"], local_q, remote_q), "ci": None},
            "cpt50": M.curve_cpt(curve["share"], curve["quality"], local_q, remote_q, 0.5),
            "cpt80": M.curve_cpt(curve["share"], curve["quality"], local_q, remote_q, 0.8),
            "curve": {"share": curve["share"].tolist(), "quality": curve["quality"].tolist()}}  # fmt: skip


def side_by_side(points: dict, quality_target: float) -> dict:
    """A policy at equal remote share (its best point at or under each of ``SHARES``) and at equal
    quality (its smallest remote share reaching ``quality_target``), with the device seconds per
    request there."""
    share, quality, local_s = (np.asarray(points[k], float) for k in ("share", "quality", "local_s"))
    out = {}
    for budget in SHARES:
        held = np.flatnonzero(share <= budget + 1e-9)
        if len(held):
            i = held[np.argmax(quality[held])]
            out[f"at_share_{budget:g}"] = {"share": float(share[i]), "quality": float(quality[i]), "local_s": float(local_s[i])}
    reached = np.flatnonzero(quality >= quality_target - 1e-9)
    if len(reached):
        i = reached[np.argmin(share[reached])]
        out["at_quality"] = {"share": float(share[i]), "quality": float(quality[i]), "local_s": float(local_s[i])}
    return out


def evaluate_policies(kept: list[dict], local_q: np.ndarray, remote_q: np.ndarray, *, quality_of, shown, first_threshold: float,
                      threshold: float, calibration: dict | None = None, n_boot: int = 1000, seed: int = 0) -> dict:  # fmt: skip
    """Router-table rows for the ladder (and the allocation, with a ``calibration`` split), and
    every policy's operating points side by side (``side_by_side``): PA threshold routing on the
    probe, the cascade, the ladder, the allocation. ``kept``: the evaluated records, each with
    ``probe_pa``, ``verifier`` and ``ladder`` (``bench.add_ladder_outcomes``); ``quality_of``:
    an answer's quality from right / wrong; ``shown``: a mean quality as the reader sees it (the
    share of right answers under exact verifiers), linear, in which "``QUALITY_OF_REMOTE`` of
    always-remote quality" is meant; the ladder's row is at ``threshold``."""
    ladder = {k: np.asarray([r["ladder"][k] for r in kept], float) for k in kept[0]["ladder"] if k != "n"}
    n_best = kept[0]["ladder"].get("n", 4)
    ladder["greedy_q"], ladder["kept_q"] = quality_of(ladder["greedy"].astype(bool)), quality_of(ladder["kept"].astype(bool))
    first = np.asarray([r["probe_pa"]["p_pass"] for r in kept], float)
    draft = np.asarray([r["verifier"]["p_pass"] for r in kept], float)
    drafted = ~defers(first, first_threshold)
    kept_s = ladder["draft_s"]
    policies = {
        "PA threshold routing (probe)": ranked_points(first, ladder["greedy_q"], remote_q, kept_s, ladder["decide_s"]),
        # A kept request was drafted; a deferred one was drafted only if the first point kept it.
        "cascade: probe, then verifier": ranked_points(cascade_scores(first, draft, first_threshold), ladder["greedy_q"], remote_q,
                                                       kept_s, np.where(drafted, kept_s, ladder["decide_s"])),
    }  # fmt: skip
    scores = np.concatenate([first, ladder["greedy_score"], ladder["kept_score"]])
    thresholds = np.unique(np.concatenate([[-np.inf], np.quantile(scores, np.linspace(0, 1, 101)), [threshold, np.inf]]))
    name = LADDER.format(n=n_best)
    policies[name] = ladder_points(ladder, first, remote_q, thresholds)
    rows = {}

    def ladder_apgr(*arrays):
        L = dict(zip(keys, arrays[:-3]))
        f, lq_b, rq_b = arrays[-3], arrays[-2], arrays[-1]
        pts = ladder_points(L, f, rq_b, thresholds)
        curve = M.policy_curve(pts["share"], pts["quality"], lq_b, rq_b)
        return M.curve_apgr(curve["share"], curve["quality"], lq_b, rq_b)

    keys = ["greedy_score", "kept_score", "greedy_q", "kept_q", "decide_s", "draft_s", "best_s"]
    row = _curve_metrics(policies[name], local_q, remote_q)
    _, lo, hi = M.bootstrap(ladder_apgr, *[ladder[k] for k in keys], first, local_q, remote_q, n_boot=n_boot, seed=seed)
    row["apgr"]["ci"] = [lo, hi]
    at = ladder_outcome(threshold, first, ladder, remote_q)
    row.update({"first_threshold": threshold, "drafted_share": float(at["drafted"].mean()), "climbed_share": float(at["climbed"].mean()),
                "remote_share_at_threshold": float(at["deferred"].mean()), "quality_at_threshold": float(at["quality"].mean()),
                "local_s_per_request": float(at["local_s"].mean())})  # fmt: skip
    rows[name] = row

    allocation = None
    if calibration:
        best_key = next(a for a in calibration["outcomes"] if a.startswith("best-of"))
        outcomes = {"answer": ladder["greedy_q"], best_key: ladder["kept_q"], "revise": quality_of(ladder["revised"].astype(bool)), "defer": remote_q}
        seconds = {"answer": kept_s, best_key: ladder["decide_s"] + ladder["best_s"], "revise": kept_s + ladder["revise_s"], "defer": ladder["decide_s"]}
        sweep, per_item = [], []
        for price in REMOTE_PRICES:
            edges, actions, cal_share = allocation_policy(calibration, price)
            deferred, q, s = allocation_outcome(first, edges, actions, outcomes, seconds)
            per_item.append((deferred, q))
            sweep.append({"price": price, "edges": edges, "actions": actions, "calibration_share": cal_share,
                          "share": float(deferred.mean()), "quality": float(q.mean()), "local_s": float(s.mean())})  # fmt: skip
        policies[ALLOCATION] = {k: np.array([p[k] for p in sweep]) for k in ("share", "quality", "local_s")}
        chosen = within_share(sweep)
        row = _curve_metrics(policies[ALLOCATION], local_q, remote_q)

        def allocation_apgr(deferred, q, lq_b, rq_b):  # items x prices, resampled by item
            curve = M.policy_curve(deferred.mean(0), q.mean(0), lq_b, rq_b)
            return M.curve_apgr(curve["share"], curve["quality"], lq_b, rq_b)

        d_matrix = np.stack([d for d, _ in per_item], axis=1).astype(float)
        q_matrix = np.stack([q for _, q in per_item], axis=1)
        _, lo, hi = M.bootstrap(allocation_apgr, d_matrix, q_matrix, local_q, remote_q, n_boot=n_boot, seed=seed)
        row["apgr"]["ci"] = [lo, hi]
        row.update({"remote_share_at_threshold": chosen["share"], "quality_at_threshold": chosen["quality"], "local_s_per_request": chosen["local_s"]})
        rows[ALLOCATION] = row
        allocation = {"chosen": chosen, "sweep": sweep, "local_price": LOCAL_PRICE, "bins": BINS, "target_share": TARGET_SHARE,
                      "calibration": {"items": calibration.get("items"), "suites": calibration.get("suites"), "fit_on": calibration.get("fit_on"),
                                      "mean_quality": {a: float(np.mean(v)) for a, v in calibration["outcomes"].items()},
                                      "mean_seconds": {a: float(np.mean(v)) for a, v in calibration["seconds"].items()}}}  # fmt: skip
    remote_mean = float(remote_q.mean())
    a, b = float(shown(1.0) - shown(0.0)), float(shown(0.0))  # shown(q) = a q + b
    quality_target = (QUALITY_OF_REMOTE * float(shown(remote_mean)) - b) / a
    table = {name: side_by_side(p, quality_target) for name, p in policies.items()}
    return {"rows": rows, "side_by_side": table, "points": {k: {kk: np.asarray(v).tolist() for kk, v in p.items()} for k, p in policies.items()},
            "allocation": allocation, "target": {"share": TARGET_SHARE, "quality_of_remote": QUALITY_OF_REMOTE, "remote_quality": remote_mean, "quality": quality_target}}  # fmt: skip
