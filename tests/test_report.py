"""The evaluation over records: routers found, baselines, quality sources, files written."""

import json

import numpy as np
import pytest

from rpra.benchmarks.report import evaluate, write_reports


def records(n=60, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        local, remote = float(rng.integers(1, 11)), float(rng.integers(5, 11))
        exact = 1.0 if local >= 7 else 0.0
        perfect = {"expected": local, "p_pass": float(local >= 7), "mode": int(local)}
        noise = float(rng.uniform(1, 10))
        flat = {"expected": noise, "p_pass": 0.5, "mode": int(round(noise))}
        out.append({"id": str(i), "judge_local": {"score": local}, "judge_remote": {"score": remote},
                    "exact_local": exact, "exact_remote": 1.0, "pa": perfect, "rpra": flat,
                    "pa_decision_ms": 100.0, "local_ms": 500.0, "remote_ms": 2000.0})  # fmt: skip
    return out


def test_a_predictor_that_knows_the_local_score_beats_noise_and_random():
    res = evaluate(records(), n_boot=200)
    r = res["routers"]
    assert r["zero-shot PA"]["auroc"]["value"] == pytest.approx(1.0)
    assert r["zero-shot PA"]["exact_acc"]["value"] == pytest.approx(1.0)
    assert r["zero-shot PA"]["apgr"]["value"] > r["zero-shot RPRA"]["apgr"]["value"]
    assert r["oracle"]["apgr"]["value"] >= r["zero-shot PA"]["apgr"]["value"] - 1e-9
    lo, hi = r["zero-shot RPRA"]["apgr"]["ci"]
    assert lo <= r["zero-shot RPRA"]["apgr"]["value"] <= hi
    assert r["always-local"]["remote_share_at_threshold"] == 0 and r["always-remote"]["remote_share_at_threshold"] == 1


def test_unscored_items_are_dropped_and_counted():
    recs = records(10)
    recs[0]["judge_local"]["score"] = None
    res = evaluate(recs, n_boot=50)
    assert res["items"] == 9 and res["dropped_unscored"] == 1


def test_exact_quality_uses_the_verifiers():
    recs = records()
    res = evaluate(recs, quality="exact", n_boot=50)
    correct = np.mean([r["exact_local"] for r in recs])
    # A correct answer counts 10, a wrong one 1.
    assert res["mean_local_quality"] == pytest.approx(1 + 9 * correct)
    assert res["mean_remote_quality"] == 10.0 and res["quality"] == "exact"
    # Score accuracy is about the judge's 1-10 score: not reported against a 1-or-10 verdict.
    assert "exact_acc" not in res["routers"]["zero-shot PA"] and "within1_acc" not in res["routers"]["zero-shot PA"]


def test_reports_are_written(tmp_path):
    res = evaluate(records(), n_boot=50)
    paths = write_reports(res, tmp_path, agreement={"accuracy": 0.9, "n": 10, "kappa": 0.8})
    assert json.loads(paths["json"].read_text())["results"]["items"] == 60
    md = paths["markdown"].read_text()
    assert "| zero-shot PA |" in md and "deferral.png" in md and "agreement 90.0%" in md
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_tokens_spent_before_the_decision_are_reported_per_protocol():
    recs = records(20)
    for r in recs:
        r["rpra_reasoning_tokens"] = 8
    r = evaluate(recs, n_boot=20)["routers"]
    assert r["zero-shot PA"]["tokens_before_decision"] == 0.0
    assert r["zero-shot RPRA"]["tokens_before_decision"] == 8.0
    assert r["zero-shot PA"]["decision_ms_p50"] == 100.0


def test_the_random_baseline_is_the_expectation_of_random_deferral():
    r = evaluate(records(), n_boot=20)["routers"]["random"]
    assert r["apgr"]["value"] == pytest.approx(0.5)
    assert r["curve"]["share"] == [0.0, 1.0]


def test_under_exact_verifiers_the_plot_shows_the_share_of_correct_answers():
    from rpra.benchmarks.report import curve_figure

    recs = records()
    res = evaluate(recs, quality="exact", n_boot=20)
    fig = curve_figure(res)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "share of correct answers"
    always = next(c for c in ax.collections)  # the always-local / always-remote points
    correct = np.mean([r["exact_local"] for r in recs])
    assert always.get_offsets()[:, 1].tolist() == pytest.approx([correct, 1.0])
    for line in ax.get_lines():
        assert 0.0 <= min(line.get_ydata()) and max(line.get_ydata()) <= 1.0


def test_under_the_llm_judge_the_plot_shows_the_mean_score():
    from rpra.benchmarks.report import curve_figure

    res = evaluate(records(), n_boot=20)
    ax = curve_figure(res).axes[0]
    assert ax.get_ylabel() == "mean quality (llm judge, 1-10)"
    assert ax.collections[0].get_offsets()[:, 1].tolist() == pytest.approx([res["mean_local_quality"], res["mean_remote_quality"]])


def test_the_markdown_header_speaks_of_correct_answers_under_exact_verifiers():
    from rpra.benchmarks.report import markdown

    recs = records()
    correct = np.mean([r["exact_local"] for r in recs])
    md = markdown(evaluate(recs, quality="exact", n_boot=20))
    assert f"Share of correct answers: local {correct:.1%}, remote 100.0%" in md
    assert "Mean quality: local" in markdown(evaluate(recs, n_boot=20))


def test_every_predictor_has_its_auroc_per_suite_where_both_classes_occur(tmp_path):
    recs = records(60)
    for i, r in enumerate(recs):
        r["suite"] = "a" if i % 2 else "b"
    recs.append({**recs[0], "id": "c0", "suite": "c"})  # one item: no AUROC there
    res = evaluate(recs, n_boot=50)
    a, c = res["by_suite"]["a"], res["by_suite"]["c"]
    assert a["n"] == 30 and a["auroc"]["zero-shot PA"] == pytest.approx(1.0) and 0 <= a["auroc"]["zero-shot RPRA"] <= 1
    assert c["n"] == 1 and c["auroc"] == {}
    report = write_reports(res, tmp_path)["markdown"].read_text()
    assert "AUROC (pass) per suite" in report and "| a | 30 |" in report


def test_under_exact_quality_the_user_gets_one_order_and_pass_is_the_label():
    from rpra.benchmarks.report import EXACT_CORRECT, quality_arrays

    lucky = {"exact_local": 1.0, "exact_remote": 1.0, "label": {"pass": False, "source": "verified"}}  # right letter in one order only
    known = {"exact_local": 1.0, "exact_remote": 0.0, "label": {"pass": True, "source": "verified"}}
    a = quality_arrays([lucky, known], quality="exact")
    assert a.local_q.tolist() == [EXACT_CORRECT, EXACT_CORRECT]  # both answers were right for the user
    assert a.passed.tolist() == [False, True]  # what the predictors learn and are scored on


def test_a_predictor_of_the_remote_too_gets_an_advantage_row_that_routes_on_the_gain():
    # 20 items where the local answer is right and the remote's wrong (keep them local); 60 where
    # the local answer is wrong and the remote right on half. A constant P(local passes) knows
    # nothing; the advantage knows where deferring gains.
    recs = []
    for i in range(80):
        local, remote = (1.0, 0.0) if i < 20 else (0.0, float(i % 2))
        pred = {"expected": 1 + 9 * 0.3, "p_pass": 0.3, "p_remote": 0.8 * remote + 0.1, "advantage": 0.3 - (0.8 * remote + 0.1)}
        flat = {"expected": 5.0, "p_pass": 0.5}
        recs.append({"id": str(i), "suite": "s", "exact_local": local, "exact_remote": remote, "probe_pa": pred, "pa": flat,
                     "label": {"pass": bool(local), "source": "verified"}})  # fmt: skip
    res = evaluate(recs, quality="exact", route_on="p_pass", threshold=0.5, n_boot=100)
    gain, plain = res["routers"]["probe (PA slot): advantage"], res["routers"]["probe (PA slot)"]
    assert "zero-shot PA: advantage" not in res["routers"]  # no P(remote passes): no such row
    assert gain["auroc_remote_better"]["value"] == pytest.approx(1.0)  # the remote-better items rank first
    assert plain["auroc_remote_better"]["value"] == pytest.approx(0.5)  # a constant P(pass) knows nothing of it
    # At threshold 0 the advantage row defers exactly where the remote is expected to do better.
    assert gain["remote_share_at_threshold"] == pytest.approx(30 / 80)
    assert gain["quality_at_threshold"] == pytest.approx(1 + 9 * 50 / 80)  # every right answer kept
    assert gain["apgr"]["value"] > plain["apgr"]["value"] == pytest.approx(0.5)
    routed_on_gain = evaluate(recs, quality="exact", route_on="advantage", threshold=-0.5, n_boot=50)["routers"]
    assert routed_on_gain["probe (PA slot): advantage"]["remote_share_at_threshold"] == pytest.approx(30 / 80)  # -0.5: the 0.9 - 0.3 gain clears it
    assert "remote_share_at_threshold" not in routed_on_gain["zero-shot PA"]  # routed on P(pass): no share at an advantage threshold


def test_every_predictor_is_compared_with_the_category_prior_on_the_same_resampled_items():
    rng = np.random.default_rng(3)
    recs = []
    for i in range(120):
        local = float(rng.random() < 0.4)
        knows = {"expected": 5.0, "p_pass": 0.2 + 0.6 * local}  # ranks the items by their pass
        prior = {"expected": 5.0, "p_pass": float(rng.uniform(0.3, 0.5))}  # knows nothing here
        recs.append({"id": str(i), "exact_local": local, "exact_remote": 1.0, "pa": knows, "prior": prior,
                     "label": {"pass": bool(local), "source": "verified"}})  # fmt: skip
    r = evaluate(recs, quality="exact", route_on="p_pass", threshold=0.5, n_boot=200)["routers"]
    diff = r["zero-shot PA"]["auroc_minus_prior"]
    assert diff["value"] == pytest.approx(r["zero-shot PA"]["auroc"]["value"] - r["category prior (train)"]["auroc"]["value"])
    assert diff["ci"][0] > 0.3  # the paired interval is clear of zero
    assert "auroc_minus_prior" not in r["category prior (train)"] and "apgr_minus_prior" in r["zero-shot PA"]


def test_a_judge_agreement_without_a_kappa_is_written_not_crashed_on(tmp_path):
    # Two items of one class: Cohen's kappa is undefined (None), as `judge.agreement` returns it.
    md = write_reports(evaluate(records(), n_boot=20), tmp_path, agreement={"accuracy": 1.0, "n": 2, "kappa": None})["markdown"].read_text()
    assert "agreement 100.0% on 2 items (Cohen's κ undefined: one class only)" in md


def test_the_cascade_defers_obvious_misses_at_once_and_ranks_the_rest_by_the_verifier():
    # 30 obvious misses the probe knows (P(pass) 0.05); 50 it cannot tell apart (0.5), of which the
    # draft is wrong on 25 and the verifier, which reads the draft, knows which.
    recs = []
    for i in range(80):
        obvious = i < 30
        right = not obvious and i % 2 == 0
        first = 0.05 if obvious else 0.5
        verdict = 0.9 if right else 0.2
        pred = lambda p, extra=None: {"expected": 1 + 9 * p, "p_pass": p, **(extra or {})}  # noqa: E731
        recs.append({"id": str(i), "suite": "s", "exact_local": float(right), "exact_remote": 1.0,
                     "probe_pa": pred(first), "verifier": pred(verdict), "pa": pred(0.5),
                     "probe_pa_decision_ms": 100.0, "pa_decision_ms": 300.0, "local_ms": 1100.0, "label": {"pass": right, "source": "verified"}})  # fmt: skip
    res = evaluate(recs, quality="exact", route_on="p_pass", threshold=0.5, n_boot=50)
    cascade, probe = res["routers"]["cascade: probe, then verifier"], res["routers"]["probe (PA slot)"]
    assert cascade["first_threshold"] == 0.1 and cascade["drafted_share"] == pytest.approx(50 / 80)
    assert cascade["local_s_per_request"] == pytest.approx((30 * 0.1 + 50 * 1.1) / 80)
    assert cascade["first_token_delay_s_p50"] == pytest.approx(0.8)  # the draft, made before any of it is shown
    # At the verify threshold 0.5: the 30 obvious misses and the 25 doubted drafts go remote.
    assert cascade["remote_share_at_threshold"] == pytest.approx(55 / 80)
    assert cascade["quality_at_threshold"] == pytest.approx(10.0)  # every answer the user gets is right
    assert cascade["apgr"]["value"] > probe["apgr"]["value"]
    assert cascade["apgr"]["value"] == pytest.approx(res["routers"]["oracle"]["apgr"]["value"], abs=0.02)
    assert "cascade: probe, then verifier: advantage" not in res["routers"]  # no P(remote passes)
    # A verify threshold of its own: 0.1 keeps every draft.
    looser = evaluate(recs, quality="exact", route_on="p_pass", threshold=0.5, verify_threshold=0.1, n_boot=50)
    assert looser["routers"]["cascade: probe, then verifier"]["remote_share_at_threshold"] == pytest.approx(30 / 80)
