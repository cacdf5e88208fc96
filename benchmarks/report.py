"""Evaluate predictors on collected records: metrics with confidence intervals, plots, reports.

One row per router: each predictor found in the records (zero-shot PA / RPRA, report card, and
later ones) plus the baselines (always-local, always-remote, random, oracle). Quality is the
LLM judge's score by default, or the exact verifier's (10 if correct, 1 if not) with
``quality="exact"`` on the items that have one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rpra.benchmarks import metrics as M
from rpra.controller import cascade_scores, defers, routed_score

# The quality of an answer under exact verifiers: a judge-scale score, so that both quality
# sources share every metric.
EXACT_CORRECT, EXACT_WRONG = 10.0, 1.0


def exact_quality(right):
    """An answer's quality under exact verifiers, from right / wrong (a bool or an array of them)."""
    return np.where(right, EXACT_CORRECT, EXACT_WRONG)


# Record fields holding a prediction dict, and the predictor each stands for.
PREDICTORS = {"pa": "zero-shot PA", "rpra": "zero-shot RPRA", "card_pa": "report card PA", "sft_pa": "SFT PA", "sft_rpra": "SFT RPRA",
              "probe_pa": "probe (PA slot)", "prior": "category prior (train)",
              "confidence_mean": "answer confidence: mean (after the answer)", "confidence_min": "answer confidence: min (after the answer)",
              "self_check": "self-verification, AutoMix (after the answer)", "verifier": "verifier (after the draft)"}
BASELINES = {"prior", "confidence_mean", "confidence_min", "self_check"}  # benchmarks.baselines: P(pass) only
ADVANTAGE = ": advantage"  # the suffix of a predictor's row routed on P(local passes) - P(remote passes)
CASCADE = "cascade: probe, then verifier"
# The cascade's first point defers at once only an obvious miss: P(pass) under 10%, an expected
# score under 2, or the remote expected to pass 50 points more often. Set before any test run,
# not tuned on one; the runtime's own first threshold is the setting ``threshold``.
CASCADE_FIRST = {"p_pass": 0.1, "expected": 2.0, "advantage": -0.5}


@dataclass
class Arrays:
    """The per-item arrays every metric takes (items without a usable score are left out)."""

    local_q: np.ndarray
    remote_q: np.ndarray
    passed: np.ndarray
    judged: np.ndarray
    kept: list[dict]
    dropped: int


def quality_arrays(records: list[dict], *, quality: str = "llm", pass_mark: int = 7) -> Arrays:
    """Scores of the local and remote answers; unparseable verdicts are dropped and counted.

    Under ``quality="exact"`` the answers' quality is the verifier's verdict on the answer the
    user gets (the options as first asked), and "pass", what AUROC, ECE and Brier score the
    predictors on, is the record's label: for multiple choice asked twice, right in both option
    orders (``collection.label``), the target the predictors learn. A right letter in one order
    only is position, which no predictor can know, but it is a right answer for the user.
    """
    kept, local, remote, passed = [], [], [], []
    for r in records:
        if quality == "exact":
            if r.get("exact_local") is None or r.get("exact_remote") is None:
                continue
            lq, rq = (EXACT_CORRECT if r["exact_local"] else EXACT_WRONG), (EXACT_CORRECT if r["exact_remote"] else EXACT_WRONG)
            label = r.get("label") or {}
            passed.append(bool(label["pass"]) if label.get("source") == "verified" else lq >= pass_mark)
        else:
            if r.get("judge_remote") is None:  # collected with --no-remote: nothing to compare against
                continue
            lq, rq = r["judge_local"]["score"], r["judge_remote"]["score"]
            if lq is None or rq is None:
                continue
            passed.append(lq >= pass_mark)
        kept.append(r)
        local.append(lq)
        remote.append(rq)
    local_q, remote_q = np.asarray(local, float), np.asarray(remote, float)
    return Arrays(local_q, remote_q, np.asarray(passed, bool), np.clip(np.rint(local_q), 1, 10).astype(int), kept, len(records) - len(kept))


def _prediction(records: list[dict], field: str, route_on: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The routed score (what the controller thresholds), P(pass), and the point prediction for
    exact / ±1 accuracy.

    The point prediction is round(E[score]), not the distribution's mode: small models' zero-shot
    distributions are often bimodal (mass at 1 and at 10), and the mode then almost never matches
    a judge's mid-scale score even when the expectation does.
    """
    routed = np.asarray([routed_score(r[field], route_on) for r in records], float)
    p_pass = np.asarray([r[field]["p_pass"] for r in records], float)
    label = np.clip(np.rint([r[field]["expected"] for r in records]), 1, 10).astype(int)
    return routed, p_pass, label


def evaluate(records: list[dict], *, quality: str = "llm", pass_mark: int = 7, threshold: float = 5.0, route_on: str = "expected",
             verify_threshold: float | None = None, calibration: dict | None = None, n_boot: int = 1000, seed: int = 0) -> dict:  # fmt: skip
    """All metrics for every predictor present in ``records`` and for the baselines.

    Routers rank and defer on ``route_on`` (E[score] or P(pass)) with the controller's own rule,
    so the remote share at ``threshold`` is the share the runtime would defer.

    A predictor whose predictions also carry P(remote passes) (a probe with a remote head, the
    category prior with remote train records) gets a second row, "<name>: advantage", routed on
    P(local passes) - P(remote passes) at threshold 0 (or ``threshold`` when ``route_on`` is
    "advantage"; then the other rows route on P(pass) and show no remote share).
    "AUROC (remote better)" ranks every router against the pairwise label APGR rewards: the
    remote's answer better than the local one. Where the category prior is present, every other
    predictor row has its AUROC and APGR minus the prior's (the advantage rows: minus the prior's
    advantage row), with paired bootstrap intervals: the bar of a predictor that knows the item.

    With both the probe and the draft verifier present, the cascade gets a row (and one on the
    advantage): the probe defers an obvious miss at once (below ``CASCADE_FIRST``), every other
    request is drafted and ranked by the verifier (``controller.cascade_scores``, the runtime's
    two points); its remote share is at ``verify_threshold`` (default: the row's threshold), and
    ``drafted_share`` / ``local_s_per_request`` say what the drafts cost the device.

    Under exact verifiers, with best-of-N outcomes on every record too (``record["ladder"]``,
    ``bench.add_ladder_outcomes``), the ladder gets a row, and with a ``calibration`` split
    (``bench.ladder_calibration``) so does the allocation; ``results["policies"]`` then holds
    every policy's operating points side by side (``benchmarks.policies``).
    """
    plain_on, plain_threshold = (route_on, threshold) if route_on != "advantage" else ("p_pass", None)
    advantage_threshold = threshold if route_on == "advantage" else 0.0
    a = quality_arrays(records, quality=quality, pass_mark=pass_mark)
    n = len(a.kept)
    if n < 2:
        raise ValueError(f"Need at least two scored items to evaluate; have {n} ({a.dropped} without a usable score).")
    lq, rq = a.local_q, a.remote_q
    remote_better = rq > lq
    rows = {}

    def ci(metric, *arrays):
        point, lo, hi = M.bootstrap(metric, *arrays, n_boot=n_boot, seed=seed)
        return {"value": point, "ci": [lo, hi]}

    def router_row(pred: np.ndarray) -> dict:
        curve = M.deferral_curve(pred, lq, rq)
        return {
            "apgr": ci(M.apgr, pred, lq, rq),
            "cpt50": M.cpt(pred, lq, rq, 0.5),
            "cpt80": M.cpt(pred, lq, rq, 0.8),
            "cpt95": M.cpt(pred, lq, rq, 0.95),
            "auroc": ci(M.auroc, pred, a.passed),
            # A low routed score should mean the remote does better: rank -score against that.
            "auroc_remote_better": ci(M.auroc, -pred, remote_better) if 0 < remote_better.sum() < n else None,
            "aurc": M.aurc(pred, a.passed),
            "curve": {"share": curve["share"].tolist(), "quality": curve["quality"].tolist()},
        }

    routed: dict[str, np.ndarray] = {}  # each predictor row's routed scores, for the paired comparisons

    def predictor_row(name: str, field: str, on: str, at: float | None) -> dict:
        pred, p_pass, label = _prediction(a.kept, field, on)
        routed[name] = pred
        row = router_row(pred)
        # How well the judge's score is predicted: under exact verifiers there is no score to hit,
        # and the baselines give only P(pass), no score.
        if quality == "llm" and field not in BASELINES and on != "advantage":
            row["exact_acc"] = ci(M.exact_accuracy, label, a.judged)
            row["within1_acc"] = ci(M.within_one_accuracy, label, a.judged)
        row.update({"spearman": ci(M.spearman, pred, lq), "ece": M.ece(p_pass, a.passed), "brier": M.brier(p_pass, a.passed)})
        if at is not None:
            deferred = defers(pred, at)
            row.update({"remote_share_at_threshold": float(deferred.mean()), "quality_at_threshold": float(np.where(deferred, rq, lq).mean())})
        # Tokens the device generates before it can decide: none for PA, the reasoning for RPRA.
        spent = [r.get(f"{field}_reasoning_tokens", 0 if field.endswith("pa") else None) for r in a.kept]
        if all(t is not None for t in spent):
            row["tokens_before_decision"] = float(np.mean(spent))
        latency = [r.get(f"{field}_decision_ms") for r in a.kept if r.get(f"{field}_decision_ms") is not None]
        if latency:
            row["decision_ms_p50"], row["decision_ms_p95"] = np.percentile(latency, [50, 95]).tolist()
        return row

    present = [(field, name) for field, name in PREDICTORS.items() if all(isinstance(r.get(field), dict) for r in a.kept)]
    bars = {}  # row -> the category prior's row it is measured against
    for field, name in present:
        rows[name] = predictor_row(name, field, plain_on, plain_threshold)
        bars[name] = PREDICTORS["prior"]
        if all(r[field].get("advantage") is not None for r in a.kept):
            rows[name + ADVANTAGE] = predictor_row(name + ADVANTAGE, field, "advantage", advantage_threshold)
            bars[name + ADVANTAGE] = PREDICTORS["prior"] + ADVANTAGE

    # The bar a predictor must clear: the category prior's, on the same resampled items (a paired
    # bootstrap, so the interval is of the difference, not two overlapping intervals).
    for name, bar in bars.items():
        pred = routed[name]
        if bar in routed and name != bar:
            rows[name]["auroc_minus_prior"] = ci(lambda p, q, y: M.auroc(p, y) - M.auroc(q, y), pred, routed[bar], a.passed)
            rows[name]["apgr_minus_prior"] = ci(lambda p, q, l, r: M.apgr(p, l, r) - M.apgr(q, l, r), pred, routed[bar], lq, rq)

    fields = {field for field, _ in present}
    if {"probe_pa", "verifier"} <= fields:
        local_ms = [r.get("local_ms") for r in a.kept]
        decision_ms = [r.get("probe_pa_decision_ms") for r in a.kept]
        for on, at, suffix in ((plain_on, plain_threshold, ""), ("advantage", advantage_threshold, ADVANTAGE)):
            if on == "advantage" and not all(r["verifier"].get("advantage") is not None for r in a.kept):
                continue
            first = np.asarray([routed_score(r["probe_pa"], on) for r in a.kept], float)
            draft = np.asarray([routed_score(r["verifier"], on) for r in a.kept], float)
            pred = cascade_scores(first, draft, CASCADE_FIRST[on])
            drafted = ~defers(first, CASCADE_FIRST[on])
            row = router_row(pred)
            row.update({"first_threshold": CASCADE_FIRST[on], "drafted_share": float(drafted.mean())})
            if all(v is not None for v in local_ms + decision_ms):
                row["local_s_per_request"] = float(np.mean(np.where(drafted, local_ms, decision_ms)) / 1000)
            # What the check adds to a drafted request's first shown token: the whole draft is made
            # first (the local turn's time after its zero-shot decision, as collected).
            answer_ms = [r["local_ms"] - r["pa_decision_ms"] for r, d in zip(a.kept, drafted)
                         if d and r.get("local_ms") is not None and r.get("pa_decision_ms") is not None]  # fmt: skip
            if answer_ms:
                row["first_token_delay_s_p50"] = float(np.median(answer_ms) / 1000)
            at = verify_threshold if verify_threshold is not None and on == plain_on else at
            if at is not None:
                deferred = defers(pred, at)
                row.update({"remote_share_at_threshold": float(deferred.mean()), "quality_at_threshold": float(np.where(deferred, rq, lq).mean())})
            rows[CASCADE + suffix] = row

    policies = None
    if quality == "exact" and {"probe_pa", "verifier"} <= fields and all("ladder" in r for r in a.kept):
        from rpra.benchmarks.policies import evaluate_policies

        at = verify_threshold if verify_threshold is not None else (threshold if plain_on == "p_pass" else 0.5)
        policies = evaluate_policies(a.kept, lq, rq, quality_of=exact_quality,
                                     shown=shown_quality({"quality": quality})[1], first_threshold=CASCADE_FIRST["p_pass"], threshold=at,
                                     calibration=calibration, n_boot=n_boot, seed=seed)  # fmt: skip
        rows.update(policies.pop("rows"))

    # Random deferral in expectation: one constant score, whose ties the metrics interpolate as
    # random tie-breaking: the straight line from always-local to always-remote, APGR 0.5. (A
    # single random draw would make the baseline itself noisy.)
    by_suite = {}
    suites = np.asarray([r.get("suite") or "" for r in a.kept])
    for suite in sorted(set(suites)):
        held = suites == suite
        entry = {"n": int(held.sum()), "local_pass_rate": float(a.passed[held].mean()), "remote_better_rate": float(remote_better[held].mean()),
                 "auroc": {}}  # fmt: skip
        if 0 < a.passed[held].sum() < held.sum():  # AUROC needs both classes
            for field, name in present:
                pred = np.asarray([routed_score(r[field], plain_on) for r in a.kept], float)
                entry["auroc"][name] = float(M.auroc(pred[held], a.passed[held]))
        by_suite[suite] = entry
    rows["random"] = router_row(np.zeros(n))
    rows["oracle"] = router_row(M.oracle_scores(lq, rq))
    rows["always-local"] = {"remote_share_at_threshold": 0.0, "quality_at_threshold": float(lq.mean())}
    rows["always-remote"] = {"remote_share_at_threshold": 1.0, "quality_at_threshold": float(rq.mean())}
    paths = {
        "local_ms": [r["local_ms"] for r in a.kept if r.get("local_ms") is not None],
        "remote_ms": [r["remote_ms"] for r in a.kept if r.get("remote_ms") is not None],
    }
    return {
        "items": n,
        "dropped_unscored": a.dropped,
        "quality": quality,
        "pass_mark": pass_mark,
        "threshold": threshold,
        "route_on": route_on,
        "local_pass_rate": float(a.passed.mean()),
        "mean_local_quality": float(lq.mean()),
        "mean_remote_quality": float(rq.mean()),
        "latency_ms": {k: dict(zip(("p50", "p95"), np.percentile(v, [50, 95]).tolist())) for k, v in paths.items() if v},
        "routers": rows,
        "by_suite": by_suite,  # per suite: items, local pass rate, each predictor's AUROC (both classes present)
        "policies": policies,  # the ladder's and the other policies' operating points, side by side (or None)
    }


def _fmt(cell) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, dict):
        if cell.get("ci") is None:
            return f"{cell['value']:.3f}"
        lo, hi = cell["ci"]
        return f"{cell['value']:.3f} [{lo:.2f}, {hi:.2f}]"
    return f"{cell:.3f}"


COLUMNS = [("APGR", "apgr"), ("CPT(50%)", "cpt50"), ("CPT(80%)", "cpt80"), ("AUROC", "auroc"), ("AUROC (remote better)", "auroc_remote_better"),
           ("AUROC - prior", "auroc_minus_prior"), ("APGR - prior", "apgr_minus_prior"), ("Spearman", "spearman"),
           ("exact acc", "exact_acc"), ("±1 acc", "within1_acc"), ("ECE", "ece"), ("Brier", "brier"), ("remote share", "remote_share_at_threshold"),
           ("tokens before decision", "tokens_before_decision"), ("decision p50 ms", "decision_ms_p50"), ("decision p95 ms", "decision_ms_p95"),
           ("drafted", "drafted_share"), ("local s / request", "local_s_per_request"), ("first token later by (s, p50)", "first_token_delay_s_p50")]  # fmt: skip


# The terminal shows the headline columns; the markdown report and JSON carry all of them.
TERMINAL_COLUMNS = [("APGR [95% CI]", "apgr"), ("CPT50", "cpt50"), ("CPT80", "cpt80"), ("AUROC", "auroc"),
                    ("Spearman", "spearman"), ("±1 acc", "within1_acc"), ("remote", "remote_share_at_threshold")]  # fmt: skip


def table_rows(results: dict, columns=COLUMNS, *, short: bool = False) -> list[list[str]]:
    """One row of formatted cells per router; ``short``: two decimals, a CI only for APGR."""

    def cell(key: str, value) -> str:
        if value is None or not short:
            return _fmt(value)
        if isinstance(value, dict):
            if key == "apgr" and value.get("ci") is not None:
                lo, hi = value["ci"]
                return f"{value['value']:.2f} [{lo:.2f}, {hi:.2f}]"
            value = value["value"]
        return f"{value:.2f}"

    return [[name, *[cell(key, row.get(key)) for _, key in columns]] for name, row in results["routers"].items()]


def shown_quality(results: dict) -> tuple[str, Callable[[Any], Any]]:
    """How a mean quality is shown to a reader: its name, and the function from the mean score.

    The LLM judge's mean score as it is. Under exact verifiers a mean of 3.25 on "1 or 10" means
    nothing to a reader, but it is the share of correct answers in disguise: (q - 1) / 9.
    """
    if results["quality"] == "exact":
        return "share of correct answers", lambda q: (np.asarray(q, float) - EXACT_WRONG) / (EXACT_CORRECT - EXACT_WRONG)
    return f"mean quality ({results['quality']} judge, 1-10)", lambda q: np.asarray(q, float)


def agreement_line(agreement: dict) -> str:
    """The judge's agreement with the exact verifiers in words (Cohen's kappa may be undefined)."""
    kappa = "undefined: one class only" if agreement.get("kappa") is None else f"{agreement['kappa']:.2f}"
    return f"LLM judge vs exact verifiers: agreement {agreement['accuracy']:.1%} on {agreement['n']} items (Cohen's κ {kappa})"


def markdown(results: dict, *, plot: str | None = None, agreement: dict | None = None, compute_plot: str | None = None) -> str:
    """A markdown report: the table, the setup, the judge's agreement with exact verifiers."""
    head = "| router | " + " | ".join(c for c, _ in COLUMNS) + " |"
    _, shown = shown_quality(results)
    local, remote = shown(results["mean_local_quality"]), shown(results["mean_remote_quality"])
    if results["quality"] == "exact":
        quality = f"Share of correct answers: local {local:.1%}, remote {remote:.1%}"
    else:
        quality = f"Mean quality: local {local:.2f}, remote {remote:.2f}"
    lines = [
        "# Deferral benchmark", "",
        f"{results['items']} items ({results['dropped_unscored']} dropped: no usable score); quality: {results['quality']} judge; "
        f"pass mark {results['pass_mark']}; remote share at threshold {results['threshold']}.",
        f"{quality}; local pass rate {results['local_pass_rate']:.1%}. 95% bootstrap intervals in brackets.", "",
        head, "|" + "---|" * (len(COLUMNS) + 1),
        *["| " + " | ".join(row) + " |" for row in table_rows(results)],
    ]  # fmt: skip
    by_suite = results.get("by_suite") or {}
    names = list(dict.fromkeys(name for entry in by_suite.values() for name in entry["auroc"]))
    if names:
        lines += ["", "AUROC (pass) per suite:", "", "| suite | items | local pass | remote better | " + " | ".join(names) + " |",
                  "|---|---|---|---|" + "---|" * len(names)]  # fmt: skip
        for suite, entry in by_suite.items():
            cells = [f"{entry['auroc'][name]:.3f}" if name in entry["auroc"] else "-" for name in names]
            better = f"{entry['remote_better_rate']:.1%}" if "remote_better_rate" in entry else "-"
            lines.append(f"| {suite} | {entry['n']} | {entry['local_pass_rate']:.1%} | {better} | " + " | ".join(cells) + " |")
    if results.get("policies"):
        lines += ["", *policy_lines(results)]
    if agreement:
        lines += ["", agreement_line(agreement) + "."]
    if plot:
        lines += ["", f"![deferral curves]({plot})"]
    if compute_plot:
        lines += ["", f"![quality against device compute]({compute_plot})"]
    return "\n".join(lines) + "\n"


def policy_lines(results: dict) -> list[str]:
    """The policies side by side (``benchmarks.policies``): each at equal remote share and at equal
    quality, with its device seconds per request, and the allocation the calibration split chose."""
    from rpra.benchmarks.policies import QUALITY_OF_REMOTE, SHARES

    policies = results["policies"]
    _, shown = shown_quality(results)
    target = policies["target"]

    def point(p: dict | None) -> str:
        return "-" if p is None else f"{shown(p['quality']):.1%} right, {p['share']:.0%} remote, {p['local_s']:.1f} s"

    head = [f"best at <= {b:.0%} remote" for b in SHARES] + [f"least remote for {QUALITY_OF_REMOTE:.0%} of always-remote ({shown(target['quality']):.1%})"]
    lines = ["Policies side by side on the same items (each cell: share right, remote share, device seconds per request):", "",
             "| policy | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]  # fmt: skip
    for name, cells in policies["side_by_side"].items():
        keys = [f"at_share_{b:g}" for b in SHARES] + ["at_quality"]
        lines.append(f"| {name} | " + " | ".join(point(cells.get(k)) for k in keys) + " |")
    alloc = policies.get("allocation")
    if alloc:
        c, cal = alloc["chosen"], alloc["calibration"]
        bins = ", ".join(f"{a}" for a in c["actions"])
        lines += ["", f"The allocation: {alloc['bins']} bins of the pre-answer P(pass) (edges {', '.join(f'{e:.3f}' for e in c['edges'])}), "
                      f"device time at {alloc['local_price']} quality points a second; calibrated on {cal['items']} train items "
                      f"(the probe's P(pass) out of fold, over {cal['fit_on']} train records). At the remote price the calibration split picks "
                      f"({c['price']}: the lowest with at most {alloc['target_share']:.0%} remote there, {c['calibration_share']:.0%}), the bins take: "
                      f"{bins}; on the test items {c['share']:.0%} remote, {shown(c['quality']):.1%} right, {c['local_s']:.1f} s per request."]  # fmt: skip
    return lines


def finish_axes(fig, ax, *, xlabel: str, ylabel: str, title: str, legend_size: int = 8):
    """The benchmark plots' common finish: labels, title, a light grid, the legend, tight layout."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return fig


def curve_figure(results: dict):
    """The matplotlib figure of quality vs remote-call share for every router, with always-local /
    always-remote marked; quality as ``shown_quality`` says."""
    from matplotlib.figure import Figure

    label, shown = shown_quality(results)
    fig = Figure(figsize=(7, 5))  # not pyplot's: no GUI backend, no global state, nothing to close
    ax = fig.subplots()
    for name, row in results["routers"].items():
        if "curve" in row:
            style = {"oracle": "k--", "random": "k:"}.get(name, "-")
            ax.plot(row["curve"]["share"], shown(row["curve"]["quality"]), style, label=f"{name} (APGR {row['apgr']['value']:.2f})")
    ax.scatter([0, 1], shown([results["mean_local_quality"], results["mean_remote_quality"]]), color="red", zorder=5,
               label="always local / always remote")  # fmt: skip
    return finish_axes(fig, ax, xlabel="share of requests sent to the remote model", ylabel=label,
                       title=f"Self-deferral: quality vs remote calls ({results['items']} items)")


def plot_curves(results: dict, path: Path) -> Path:
    """``curve_figure`` saved as a PNG at ``path``."""
    curve_figure(results).savefig(path, dpi=120)
    return path


def compute_figure(results: dict):
    """Quality against device seconds per request (as Snell et al. draw test-time compute): each
    policy's best point at or under each remote budget of ``policies.SHARES`` (the side-by-side
    table's): what more device compute buys at a fixed remote share."""
    from matplotlib.figure import Figure

    from rpra.benchmarks.policies import SHARES

    label, shown = shown_quality(results)
    policies = results["policies"]
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for k, (name, cells) in enumerate(policies["side_by_side"].items()):
        for budget, marker in zip(SHARES, ("o", "s")):
            if p := cells.get(f"at_share_{budget:g}"):
                ax.scatter([p["local_s"]], [shown(p["quality"])], marker=marker, s=70, color=f"C{k}", zorder=5,
                           label=f"{name} (<= {budget:.0%} remote)")  # fmt: skip
    ax.axhline(shown(results["mean_remote_quality"]), color="k", ls="--", lw=1, label="always remote")
    ax.axhline(shown(policies["target"]["quality"]), color="k", ls=":", lw=1, label="the ladder's target quality")
    ax.axhline(shown(results["mean_local_quality"]), color="r", ls=":", lw=1, label="always local")
    return finish_axes(fig, ax, xlabel="device seconds per request (mean)", ylabel=label, legend_size=7,
                       title=f"Quality against device compute at a remote budget ({results['items']} items)")


def write_reports(results: dict, out_dir: Path, *, agreement: dict | None = None) -> dict[str, Path]:
    """results.json, deferral.png and report.md in ``out_dir`` (and compute.png with the policies)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "plot": out_dir / "deferral.png", "markdown": out_dir / "report.md"}
    paths["json"].write_text(json.dumps({"results": results, "agreement": agreement}, indent=2))
    plot_curves(results, paths["plot"])
    if results.get("policies"):
        paths["compute"] = out_dir / "compute.png"
        compute_figure(results).savefig(paths["compute"], dpi=120)
    paths["markdown"].write_text(markdown(results, plot=paths["plot"].name, agreement=agreement,
                                          compute_plot=paths["compute"].name if "compute" in paths else None))  # fmt: skip
    return paths
