"""The cascade's second decision point: a verifier on the local draft (real SmolLM2 GGUF through
llama.cpp, a real OpenAI-compatible remote on 127.0.0.1), and the controller's pure rule."""

from __future__ import annotations

import numpy as np
import pytest

from rpra.controller import Controller, cascade_scores, defers
from rpra.errors import ConfigError
from rpra.local import LocalModel
from rpra.prediction import Prediction
from rpra.predictors import DraftVerifier
from rpra.probe import Probe, draft_features
from rpra.remote import RemoteModel
from rpra.runtime import Decided, Finished, Notice, Runtime, Text

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LAYER = 10
CASCADE = dict(route_on="p_pass", threshold=0.0, verify_threshold=0.5)  # the prompt keeps all; the draft decides


def verifier(width: int, *, bias: float, weights: np.ndarray | None = None) -> DraftVerifier:
    """A verifier head on real draft features: its bias sets P(pass), so a test knows the verdict."""
    n = 2 * width + 3
    probe = Probe(np.zeros(n), np.ones(n), np.zeros(n) if weights is None else weights, bias, 0.0, 10,
                  meta={"reads": "draft"}, layer=LAYER, head="logistic")  # fmt: skip
    return DraftVerifier(probe)


# -- the rule, pure ------------------------------------------------------------------------------


def test_check_keeps_or_defers_a_draft_on_the_first_points_quantity():
    controller = Controller(threshold=0.3, route_on="p_pass", verify_threshold=0.5)
    first = controller.decide(Prediction((0.4, 0.6), 2))
    assert first.route == "local" and first.point == "prompt"
    kept = controller.check(first, Prediction((0.2, 0.8), 2, "verifier"))
    deferred = controller.check(first, Prediction((0.7, 0.3), 2, "verifier"))
    assert kept.route == "local" and kept.point == "draft" and kept.draft_score == pytest.approx(0.8)
    assert deferred.route == "remote" and "draft checked: P(pass) 0.30 < P(pass) 0.50" in deferred.reason
    assert deferred.to_dict()["point"] == "draft" and deferred.to_dict()["draft_threshold"] == 0.5
    assert controller.check(controller.decide(Prediction((0.4, 0.6), 2), mode="local-only"), Prediction((0.9, 0.1), 2)).route == "local"
    with pytest.raises(ValueError, match="kept local"):
        controller.check(controller.decide(Prediction((0.9, 0.1), 2)), Prediction((0.2, 0.8), 2))


def test_check_on_the_advantage_uses_the_prompts_remote_prediction():
    controller = Controller(threshold=-0.5, route_on="advantage", verify_threshold=0.0)
    first = controller.decide(Prediction((0.5, 0.5), 2, "probe", p_remote=0.7))  # -0.2: not an obvious miss
    assert first.route == "local"
    assert controller.check(first, Prediction((0.2, 0.8), 2, "verifier", p_remote=0.7)).route == "local"  # +0.1
    assert controller.check(first, Prediction((0.6, 0.4), 2, "verifier", p_remote=0.7)).route == "remote"  # -0.3


def test_cascade_scores_replay_decide_then_check():
    """What the benchmark thresholds is what the runtime's two points defer, request by request."""
    rng = np.random.default_rng(0)
    first, draft = rng.uniform(0, 1, 500), rng.uniform(0, 1, 500)
    scores = cascade_scores(first, draft, 0.3)
    for t2 in (0.0, 0.2, 0.5, 0.9, 1.0):
        controller = Controller(threshold=0.3, route_on="p_pass", verify_threshold=t2)
        expected = []
        for f, d in zip(first, draft):
            decision = controller.decide(Prediction((1 - f, f), 2))
            if decision.route == "local":
                decision = controller.check(decision, Prediction((1 - d, d), 2))
            expected.append(decision.route == "remote")
        assert np.array_equal(defers(scores, t2), np.array(expected))
    # Below every draft score, the ranking is the first point's own: its deferrals first, in order.
    first_deferred = first < 0.3
    assert np.all(scores[first_deferred] < scores[~first_deferred].min())
    assert np.array_equal(np.argsort(scores[first_deferred]), np.argsort(first[first_deferred]))


def test_draft_features_layout():
    slot, draft = np.ones(4), np.full(4, 2.0)
    x = draft_features(slot, draft, [-0.1, -2.0, -0.3])
    assert x.shape == (11,) and np.allclose(x[:8], [1] * 4 + [2] * 4)
    assert np.allclose(x[8:], [-0.8, -2.0, np.log1p(3)])
    assert np.allclose(draft_features(slot, draft, {"mean": -0.8, "min": -2.0, "tokens": 3}), x)


def test_a_slot_probe_is_not_a_verifier():
    probe = Probe(np.zeros(3), np.ones(3), np.zeros(3), 0.0, 0.0, 10, layer=LAYER, head="logistic")
    with pytest.raises(ValueError, match="reads the PA slot"):
        DraftVerifier(probe)


# -- the runtime, real model and remote -----------------------------------------------------------


@pytest.fixture(scope="module")
def capturing(model_path):
    model = LocalModel(model_path, n_ctx=1024, n_threads=2, seed=0, capture_layers=[LAYER])
    yield model
    model.close()


@pytest.mark.slow
def test_a_draft_the_verifier_trusts_is_shown_as_the_plain_answer(greedy_settings, capturing, local_model, remote_server):
    remote = RemoteModel(remote_server.url, model="stand-in")
    plain = Runtime(greedy_settings(threshold=0.0), local=local_model, remote=remote).ask(QUESTION)
    runtime = Runtime(greedy_settings(**CASCADE), local=capturing, remote=remote, verifier=verifier(capturing.n_embd, bias=5.0))
    events = list(runtime.turn(QUESTION))
    assert isinstance(events[0], Notice) and "checking" in events[0].message
    decided = [e for e in events if isinstance(e, Decided)]
    assert len(decided) == 1 and events.index(decided[0]) < min(i for i, e in enumerate(events) if isinstance(e, Text))
    result = events[-1].result
    assert result.answered_by == "local" and result.answer == plain.answer
    assert result.decision.point == "draft" and result.decision.draft_score > 0.99 and result.decision.draft_threshold == 0.5
    assert result.draft_prediction.predictor == "verifier" and result.discarded_draft is None
    assert result.to_dict()["draft_prediction"]["p_pass"] > 0.99


@pytest.mark.slow
def test_a_draft_the_verifier_doubts_is_deferred_unseen(greedy_settings, capturing, remote_server):
    remote = RemoteModel(remote_server.url, model="stand-in")
    runtime = Runtime(greedy_settings(**CASCADE), local=capturing, remote=remote, verifier=verifier(capturing.n_embd, bias=-5.0))
    events = list(runtime.turn(QUESTION))
    texts = [e for e in events if isinstance(e, Text)]
    assert texts and all(e.source == "remote" for e in texts)  # not one token of the draft was shown
    result = events[-1].result
    assert result.answered_by == "remote" and result.decision.route == "remote" and result.decision.point == "draft"
    assert result.discarded_draft and result.tokens["local_answer"] > 0
    assert "draft checked" in result.verdict and result.verdict.startswith("deferred")
    assert not capturing.lock.locked()


@pytest.mark.slow
def test_a_deferred_draft_is_the_fallback_when_the_remote_fails(greedy_settings, capturing):
    dead = RemoteModel("http://127.0.0.1:9/v1", retries=1, timeout=1.0, backoff=0.01)
    runtime = Runtime(greedy_settings(**CASCADE), local=capturing, remote=dead, verifier=verifier(capturing.n_embd, bias=-5.0))
    events = list(runtime.turn(QUESTION))
    result = events[-1].result
    assert result.fallback and result.answered_by == "local"
    assert result.tokens["local_answer"] > 0 and result.answer  # the draft, not a second generation
    assert [e.text for e in events if isinstance(e, Text)][-1].strip() == result.answer
    assert any(isinstance(e, Notice) and "draft" in e.message for e in events)


@pytest.mark.slow
def test_the_verifier_reads_the_states_the_draft_made(greedy_settings, capturing, remote_server):
    """The verdict at run time equals the head applied to ``Runtime.read_draft`` of the shown answer."""
    rng = np.random.default_rng(1)
    n = capturing.n_embd
    weights = np.concatenate([rng.normal(0, 0.02, 2 * n), [0.5, 0.5, 0.1]])
    check = verifier(n, bias=3.0, weights=weights)
    remote = RemoteModel(remote_server.url, model="stand-in")
    runtime = Runtime(greedy_settings(threshold=0.0, route_on="p_pass", verify_threshold=0.0), local=capturing, remote=remote, verifier=check)
    result = runtime.ask(QUESTION)
    slot, draft = runtime.read_draft(QUESTION, result.answer)
    stats = {**result.local_logprobs, "tokens": result.tokens["local_answer"]}
    offline = check.verify(slot[LAYER], draft[LAYER], stats, pass_mark=7)
    assert result.draft_prediction.p_pass == pytest.approx(offline.p_pass, abs=0.02)


def test_a_verifier_needs_its_layer_captured_and_pa(greedy_settings, local_model):
    with pytest.raises(ConfigError, match="does not capture"):
        Runtime(greedy_settings(), local=local_model, verifier=verifier(local_model.n_embd, bias=0.0))
    with pytest.raises(ConfigError, match="protocol = pa"):
        greedy_settings(verifier="v.npz", protocol="rpra")


def test_the_draft_threshold_defaults_to_the_threshold():
    assert Controller(threshold=0.4, route_on="p_pass").draft_threshold == 0.4
    assert Controller(threshold=0.4, route_on="p_pass", verify_threshold=0.7).draft_threshold == 0.7


@pytest.mark.slow
def test_the_verifier_commands_as_a_user_runs_them(rpra, model_path, isolated_home, tmp_path, remote_server):
    """`rpra train verifier` on a collected train split, `rpra train list` shows it, then
    `rpra ask --json --set verifier=...` checks its draft before answering."""
    import json
    import os

    env = {**os.environ, "RPRA_MODEL": str(model_path), "RPRA_N_CTX": "1024", "RPRA_N_THREADS": "2", "RPRA_MAX_TOKENS": "8",
           "RPRA_REMOTE_URL": remote_server.url, "RPRA_REMOTE_MODEL": "stand-in"}  # fmt: skip
    folder = isolated_home / "collections" / "smollm2-135m-instruct--rpra-mix--train"
    folder.mkdir(parents=True)
    records = [{"id": f"t:{i}", "suite": "arithmetic", "prompt": f"What is {i} + {i}?", "local_answer": str(2 * i if i % 2 else 2 * i + 1),
                "local_tokens": 2, "local_logprobs": {"mean": -0.2 - 0.1 * (i % 2 == 0), "min": -0.5}, "exact_local": float(i % 2),
                "label": {"pass": bool(i % 2), "source": "verified"}} for i in range(12)]  # fmt: skip
    folder.joinpath("records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "smollm2.verifier.npz"
    fit = rpra("train", "verifier", "--folds", "2", "--layer", "9", "--output", str(out), env=env)
    assert fit.returncode == 0, fit.stderr
    assert f"verifier: {out}" in fit.stdout and "layer 9 · 12 drafts, 6 right" in fit.stdout and "log-probabilities alone" in fit.stdout
    assert Probe.load(out).reads == "draft" and Probe.load(out).layer == 9
    asked = rpra("ask", "What is 2 + 2?", "--json", "--set", f"verifier={out}", "--set", "route_on=p_pass", "--set", "threshold=0",
                 "--set", "verify_threshold=0.5", env=env)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert answer["draft_prediction"]["predictor"] == "verifier" and answer["decision"]["point"] == "draft"
    assert (answer["answered_by"] == "remote") == (answer["draft_prediction"]["p_pass"] < 0.5)
    assert (answer["discarded_draft"] is not None) == (answer["answered_by"] == "remote")
    probe_as_verifier = rpra("ask", "Hi", "--set", f"verifier={_slot_probe(tmp_path)}", env=env)
    assert probe_as_verifier.returncode != 0 and "reads the PA slot" in probe_as_verifier.stderr


def _slot_probe(tmp_path) -> str:
    path = tmp_path / "slot.probe.npz"
    Probe(np.zeros(3), np.ones(3), np.zeros(3), 0.0, 0.0, 10, layer=LAYER, head="logistic").save(path)
    return str(path)


@pytest.mark.slow
def test_a_doubted_draft_climbs_to_best_of_n_before_it_defers(greedy_settings, model_path, remote_server):
    """best_of: a doubted draft gets N more drafts in one batch; the verifier's weighted best is
    shown if it passes, else the request defers. The verifier here trusts an answer the less its
    tokens were likely (weight -10 on the mean log-probability): the greedy draft is doubted, a
    sampled one at temperature 1 is trusted."""
    parallel = LocalModel(model_path, n_ctx=1024, n_threads=2, seed=0, capture_layers=[LAYER], parallel=3)
    n = parallel.n_embd
    weights = np.zeros(2 * n + 3)
    weights[2 * n] = -10.0
    remote = RemoteModel(remote_server.url, model="stand-in")
    try:
        climbs = Runtime(greedy_settings(**CASCADE, best_of=3, sample_temperature=1.0, verifier="v.npz"), local=parallel, remote=remote,
                         verifier=verifier(n, bias=-4.0, weights=weights))  # fmt: skip
        events = list(climbs.turn(QUESTION))
        result = events[-1].result
        assert [r["rung"] for r in result.rungs] == ["draft", "best-of-3"] and not result.rungs[0]["kept"]
        assert result.rungs[1]["kept"] and result.answered_by == "local" and result.decision.route == "local"
        assert result.draft_prediction.p_pass > 0.5 and result.to_dict()["rungs"] == result.rungs
        assert [e.text for e in events if isinstance(e, Text)] == [result.answer]  # one piece, after the check
        assert any(isinstance(e, Notice) and "drawing 3 more" in e.message for e in events)
        defers = Runtime(greedy_settings(**CASCADE, best_of=3, verifier="v.npz"), local=parallel, remote=remote,
                         verifier=verifier(n, bias=-5.0))  # fmt: skip
        result = defers.ask(QUESTION)
        assert [r["kept"] for r in result.rungs] == [False, False] and result.answered_by == "remote"
        assert result.discarded_draft
    finally:
        parallel.close()
    with pytest.raises(ConfigError, match="parallel=3"):
        Runtime(greedy_settings(**CASCADE, best_of=3, verifier="v.npz"), local=capturing_model(model_path), remote=remote,
                verifier=verifier(n, bias=0.0))


def capturing_model(model_path) -> LocalModel:
    return LocalModel(model_path, n_ctx=256, n_threads=1, capture_layers=[LAYER])


# -- the ladder's allocation ---------------------------------------------------------------------


def test_an_allocation_routes_each_bin_to_its_rung_instead_of_the_threshold(tmp_path):
    from rpra.ladder import Allocation

    allocation = Allocation((0.1, 0.3, 0.6), ("defer", "best-of-4", "revise", "answer"), {"model": "m"})
    controller = Controller(threshold=0.99, route_on="p_pass", allocation=allocation)
    decide = lambda p, mode=None: controller.decide(Prediction((1 - p, p), 2, "probe"), mode)  # noqa: E731
    assert [(d.route, d.action) for d in map(decide, (0.05, 0.2, 0.5, 0.9))] == [
        ("remote", "defer"), ("local", "best-of-4"), ("local", "revise"), ("local", "answer")]  # fmt: skip
    assert "allocation: P(pass) 0.20 -> best-of-4" in decide(0.2).reason and decide(0.2).to_dict()["action"] == "best-of-4"
    assert decide(0.05, "local-only").route == "local" and decide(0.05, "local-only").action is None
    assert allocation.best_of == 4 and allocation.drafts
    again = Allocation.load(allocation.save(tmp_path / "m.ladder.json"))
    assert again == allocation
    for bad, message in ((((0.5,), ("answer",)), "one action per bin"), (((0.5, 0.2), ("answer",) * 3), "increasing"),
                         (((0.5,), ("answer", "best-of-1")), "Unknown allocation action")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            Allocation(*bad)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not an allocation file"):
        Allocation.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="No allocation file"):
        Allocation.load(tmp_path / "absent.json")
    from rpra.config import Settings

    with pytest.raises(ConfigError, match="predictor = probe"):
        Settings(allocation="a.json")
    with pytest.raises(ConfigError, match="set one of them"):
        Settings(allocation="a.json", predictor="probe", pool="pool.toml")


@pytest.mark.slow
def test_the_allocations_rungs_run_on_the_device(greedy_settings, model_path, remote_server):
    """A request whose bin gets best-of-3 is answered by the verifier's weighted pick of 3 drafts
    in one batch; one whose bin gets revise is drafted, doubted and revised; one whose bin gets
    defer goes to the remote at once, and one whose bin gets answer streams as usual."""
    from rpra.ladder import Allocation
    from rpra.predictors import ProbePredictor

    parallel = LocalModel(model_path, n_ctx=1024, n_threads=2, seed=0, capture_layers=[LAYER], parallel=3)
    n = parallel.n_embd
    remote = RemoteModel(remote_server.url, model="stand-in")

    def runtime(action: str, verdict_bias: float) -> Runtime:
        probe = ProbePredictor(Probe(np.zeros(n), np.ones(n), np.zeros(n), 0.0, 0.0, 10, layer=LAYER, head="logistic"))  # P(pass) 0.5
        return Runtime(greedy_settings(route_on="p_pass", threshold=0.5, predictor="probe", verifier="v.npz", allocation="a.json"),
                       local=parallel, remote=remote, predictor=probe, verifier=verifier(n, bias=verdict_bias),
                       allocation=Allocation((), (action,)))  # fmt: skip

    try:
        events = list(runtime("best-of-3", 1.0).turn(QUESTION))
        result = events[-1].result
        assert result.decision.action == "best-of-3" and result.answered_by == "local" and result.tokens["local_answer"] > 0
        assert [r["rung"] for r in result.rungs] == ["best-of-3"] and result.draft_prediction.p_pass == pytest.approx(1 / (1 + np.exp(-1)))
        assert [e.text for e in events if isinstance(e, Text)] == [result.answer] and result.answer
        assert any(isinstance(e, Notice) and "3 drafts in one batch" in e.message for e in events)
        revised = runtime("revise", -3.0).ask(QUESTION)  # every draft doubted: revised, kept only if scored higher (a tie is not)
        assert [r["rung"] for r in revised.rungs] == ["draft", "revise"] and not revised.rungs[1]["kept"] and revised.answered_by == "local"
        assert runtime("defer", 0.0).ask(QUESTION).answered_by == "remote"
        plain = runtime("answer", 0.0).ask(QUESTION)
        assert plain.answered_by == "local" and plain.rungs == [] and plain.decision.action == "answer"
    finally:
        parallel.close()
    with pytest.raises(ConfigError, match="verifier"):
        Runtime(greedy_settings(predictor="probe", allocation="a.json"), local=None, allocation=Allocation((), ("best-of-3",)))
