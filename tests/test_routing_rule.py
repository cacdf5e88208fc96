"""One routing rule: what the benchmark and `rpra calibrate` report is what the controller does.

Recorded predictions are replayed through `rpra bench report` (the real command, on a collection
written to disk) and through the calibration, with route_on = p_pass, and their deferral shares
are checked against ``Controller.decide`` on the same predictions. The predictions are built so
that E[score] and P(pass) rank the items differently: a rule that thresholded the expected score
instead would defer another share.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rpra.benchmarks.calibrate import calibrate
from rpra.benchmarks.collection import collection_dir
from rpra.benchmarks.report import evaluate
from rpra.controller import Controller, routed_score
from rpra.prediction import Prediction


def _records(n: int = 40, seed: int = 1) -> list[dict]:
    """Judged records whose PA predictions mix bimodal (high P(pass), low mean) and flat ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        probs = rng.dirichlet(np.full(10, 0.3))  # spiky: E[score] and P(pass) disagree often
        prediction = Prediction(tuple(float(p) for p in probs / probs.sum()), pass_mark=7)
        local, remote = float(rng.integers(1, 11)), float(rng.integers(4, 11))
        out.append({"id": f"r{i}", "suite": "arithmetic", "category": "level-1", "kind": "number", "prompt": f"q{i}",
                    "pa": prediction.to_dict(), "judge_local": {"score": local}, "judge_remote": {"score": remote},
                    "exact_local": None, "exact_remote": None})  # fmt: skip
    return out


def _controller_share(records: list[dict], threshold: float, route_on: str) -> float:
    controller = Controller(threshold=threshold, route_on=route_on)
    decisions = [controller.decide(_prediction(r["pa"])).route for r in records]
    return decisions.count("remote") / len(decisions)


def _prediction(d: dict) -> Prediction:
    """The Prediction a record's dict was made from (renormalised: the dict rounds to 6 digits)."""
    probs = [d["distribution"][str(i)] for i in range(1, len(d["distribution"]) + 1)]
    return Prediction(tuple(p / sum(probs) for p in probs), d["pass_mark"])


def test_the_records_rank_differently_by_expected_score_and_p_pass():
    # Without this the tests below could not tell the two rules apart.
    recs = _records()
    expected = [routed_score(r["pa"], "expected") for r in recs]
    p_pass = [routed_score(r["pa"], "p_pass") for r in recs]
    assert np.corrcoef(np.argsort(np.argsort(expected)), np.argsort(np.argsort(p_pass)))[0, 1] < 0.95
    assert _controller_share(recs, 0.3, "p_pass") != _controller_share(recs, 0.3 * 10, "expected")


def test_evaluate_defers_what_the_controller_defers_for_either_route_on():
    recs = _records()
    for route_on, threshold in (("p_pass", 0.3), ("p_pass", 0.6), ("expected", 5.0)):
        row = evaluate(recs, threshold=threshold, route_on=route_on, n_boot=10)["routers"]["zero-shot PA"]
        assert row["remote_share_at_threshold"] == pytest.approx(_controller_share(recs, threshold, route_on))


def test_calibrate_with_p_pass_picks_a_threshold_at_which_the_controller_defers_the_target_share():
    recs = _records()
    result = calibrate(recs, protocol="pa", route_on="p_pass", pass_mark=7, target_share=0.25)
    assert 0.0 <= result["threshold"] <= 1.0  # a probability, not a score
    assert result["remote_share"] == pytest.approx(_controller_share(recs, result["threshold"], "p_pass"))
    assert result["remote_share"] == pytest.approx(0.25, abs=0.05)


@pytest.mark.slow
def test_bench_report_through_the_cli_routes_on_p_pass_like_the_controller(rpra, model_path, isolated_home):
    recs = _records()
    folder = collection_dir(str(model_path), "arithmetic", "test")
    folder.mkdir(parents=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    env = {**os.environ, "RPRA_MODEL": str(model_path)}
    run = rpra("bench", "report", "--suite", "arithmetic", "--json", "--set", "route_on=p_pass", "--set", "threshold=0.3", env=env)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)["results"]
    assert results["route_on"] == "p_pass"
    share = results["routers"]["zero-shot PA"]["remote_share_at_threshold"]
    assert share == pytest.approx(_controller_share(recs, 0.3, "p_pass"))
