"""Best-of-N: the selection rules (pure), and N answers decoded as parallel sequences in one
llama.cpp batch on the real SmolLM2 GGUF."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rpra.errors import ConfigError, PromptTooLongError
from rpra.ladder import answer_key, choose
from rpra.local import Generated, LocalModel
from rpra.runtime import Runtime

QUESTION = [{"role": "user", "content": "What is 17 + 25? Answer with the number."}]


def test_answers_agree_on_their_final_number_or_their_first_line():
    assert answer_key("17 + 25 = 42") == answer_key("The answer is 42.") == answer_key("42.0") == "number:42"
    assert answer_key("1,234 apples") == "number:1234"
    assert answer_key("Paris, of course!\nMore text") == answer_key("paris of course") != answer_key("Lyon")


def test_weighted_best_of_n_pools_the_scores_of_agreeing_answers():
    answers = ["= 41", "so 42", "it is 42", "43"]
    scores = [0.9, 0.5, 0.6, 0.2]
    assert choose(answers, scores, rule="best") == 0  # one high score
    assert choose(answers, scores, rule="weighted") == 2  # 42 pools 1.1 > 0.9; its best member is kept
    assert choose(answers, scores, rule="majority") == 2
    assert choose(["a", "b"], [0.5, 0.5], rule="best") == 0  # ties: the earlier (greedy) answer
    with pytest.raises(ValueError, match="one score per answer"):
        choose(["a"], [0.1, 0.2])
    with pytest.raises(ValueError, match="Unknown best-of-N rule"):
        choose(["a"], [0.1], rule="vote")




@pytest.fixture(scope="module")
def parallel(model_path):
    model = LocalModel(model_path, n_ctx=1024, n_threads=2, seed=0, capture_layers=[10], parallel=4)
    yield model
    model.close()


@pytest.mark.slow
def test_parallel_sequences_share_the_prompt_and_draw_their_own_answers(parallel, greedy_settings):
    runtime = Runtime(greedy_settings(), local=parallel)
    slot, drafts = runtime.drafts(QUESTION, 4, temperature=1.0, max_tokens=16)
    assert len(drafts) == 4 and all(d.tokens > 0 and len(d.logprobs) == d.tokens for d in drafts)
    assert len({d.text for d in drafts}) > 1  # the sampled ones differ
    assert all(sorted(d.states) == [10] and d.states[10].shape == (parallel.n_embd,) for d in drafts)
    assert slot[10].shape == (parallel.n_embd,)
    # Afterwards the context holds the prompt alone, and a plain greedy turn is as without them.
    plain = LocalModel(parallel.path, n_ctx=1024, n_threads=2, seed=0)
    try:
        expected = Runtime(greedy_settings(threshold=0.0), local=plain).ask(QUESTION).answer
    finally:
        plain.close()
    assert Runtime(greedy_settings(threshold=0.0), local=parallel).ask(QUESTION).answer == expected


@pytest.mark.slow
def test_batched_and_sequential_drafts_agree_on_the_greedy_one_and_its_states(parallel, greedy_settings):
    """Sequence 0 is greedy in both; its states over the answer are the same read either way
    (the batch's kernels round differently, so a near tie may flip a late token: compare the
    answer's start and the states' correlation)."""
    runtime = Runtime(greedy_settings(), local=parallel)
    _, batched = runtime.drafts(QUESTION, 4, temperature=0.8, max_tokens=8)
    _, sequential = runtime.drafts(QUESTION, 4, temperature=0.8, max_tokens=8, batched=False)
    assert batched[0].text[:6] == sequential[0].text[:6]
    assert np.corrcoef(batched[0].states[10], sequential[0].states[10])[0, 1] > 0.98
    assert [d.tokens <= 8 for d in batched + sequential] == [True] * 8


@pytest.mark.slow
def test_more_sequences_than_the_model_was_opened_for_are_refused(parallel, local_model, greedy_settings):
    with parallel.lock:
        session = parallel.session(parallel.chat_tokens(QUESTION))
        with pytest.raises(ValueError, match="parallel=4"):
            session.sample_many(5, 8, temperature=0.5)
        with pytest.raises(PromptTooLongError, match="do not fit"):
            session.sample_many(4, 400, temperature=0.5)
    with pytest.raises(ConfigError, match="captures layers"):
        Runtime(greedy_settings(), local=local_model).drafts(QUESTION, 2, temperature=0.5)
    with pytest.raises(ConfigError, match="parallel is 0"):
        LocalModel(parallel.path, n_ctx=256, parallel=0)


@pytest.mark.slow
def test_a_revision_is_read_as_an_answer_to_the_question_itself(parallel, greedy_settings):
    runtime = Runtime(greedy_settings(), local=parallel)
    revision, slot, states = runtime.revise(QUESTION, "17 + 25 = 32", max_tokens=16)
    assert revision.tokens > 0 and revision.text and not revision.text.lower().startswith("rating")
    again_slot, again_states = runtime.read_draft(QUESTION, revision.text)
    assert np.allclose(states[10], again_states[10]) and np.allclose(slot[10], again_slot[10])


def test_allocation_gives_each_difficulty_bin_its_best_action_for_the_price():
    from rpra.ladder import allocate, policy_action

    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 400)  # the pre-answer P(pass)
    hard, mid = scores < 0.25, (scores >= 0.25) & (scores < 0.5)
    outcomes = {
        "answer": np.where(scores >= 0.5, 1.0, np.where(mid, 0.3, 0.0)),
        "best-of-4": np.where(scores >= 0.5, 1.0, np.where(mid, 0.9, 0.1)),  # more compute pays in the middle
        "defer": np.full(400, 0.8),
    }
    edges, actions = allocate(scores, outcomes, {"answer": 0.0, "best-of-4": 0.1, "defer": 0.5}, bins=4)
    assert len(edges) == 3 and actions == ["defer", "best-of-4", "answer", "answer"]
    assert policy_action(0.1, edges, actions) == "defer" and policy_action(0.9, edges, actions) == "answer"
    # A dear remote: the hardest bin answers locally instead of paying for it.
    _, dear = allocate(scores, outcomes, {"answer": 0.0, "best-of-4": 0.1, "defer": 5.0}, bins=4)
    assert "defer" not in dear
    with pytest.raises(ValueError, match="No cost"):
        allocate(scores, outcomes, {"answer": 0.0}, bins=2)


def test_the_best_of_n_report_counts_each_rule_and_the_speed_ratio(tmp_path):
    from rpra.benchmarks.best_of_n import compute_figure, markdown, summarise
    from rpra.probe import Probe

    rows = [{"id": str(i), "suite": "gsm" if i % 2 else "arithmetic", "right": [i < 2, True, False, False], "scores": [0.1, 0.9, 0.2, 0.3],
             "answers": ["a", "b", "c", "d"], "tokens": [4, 4, 4, 4], "weighted": True, "best": True, "majority": i < 2, "revised": i < 3}
            for i in range(4)]  # fmt: skip
    timings = [{"batched_s": 2.0, "sequential_s": 4.0, "batched_tokens": 16, "sequential_tokens": 16}] * 3
    verifier = Probe(np.zeros(3), np.ones(3), np.zeros(3), 0.0, 0.0, 10, meta={"cv_auroc_pass": 0.8, "examples": 9}, layer=5, head="logistic")
    result = summarise(rows, timings, model="m", sha="s", n=4, temperature=0.7, max_tokens=8, threads=1, verifier=verifier)
    assert result["all"]["greedy"] == 0.5 and result["all"]["weighted"] == 1.0 and result["all"]["relative_gain_weighted"] == 1.0
    assert result["all"]["any of 4"] == 1.0 and result["all"]["revised"] == 0.75 and result["by_suite"]["gsm"]["items"] == 2
    assert result["speed"]["median_ratio"] == 0.5 and result["speed"]["median_ratio_per_token"] == 0.5
    text = markdown(result)
    assert "| all | 4 | 50.0% | 100.0% |" in text and "median time ratio **0.50**" in text
    compute_figure(result).savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def _ladder_records():
    """100 requests, the remote right on all: 20 obvious misses the probe knows (P(pass) 0.05), 40
    easy ones the device gets right (its draft scored 0.9), and 40 it drafts wrong (scored 0.2),
    where best-of-4 finds a right answer the verifier trusts on 30 (0.8), a wrong one on 10 (0.3)."""
    recs = []
    for i in range(100):
        kind = "obvious" if i < 20 else "easy" if i < 60 else "middle"
        rescued = kind == "middle" and i < 90
        pred = lambda p: {"expected": 1 + 9 * p, "p_pass": p}  # noqa: E731
        greedy = kind == "easy"
        greedy_score = {"obvious": 0.1, "easy": 0.9, "middle": 0.2}[kind]
        recs.append({"id": str(i), "suite": "s", "exact_local": float(greedy), "exact_remote": 1.0, "label": {"pass": greedy, "source": "verified"},
                     "probe_pa": pred({"obvious": 0.05, "easy": 0.9, "middle": 0.5}[kind]), "verifier": pred(greedy_score), "pa": pred(0.5),
                     "probe_pa_decision_ms": 100.0, "pa_decision_ms": 100.0, "local_ms": 1100.0,
                     "ladder": {"greedy": greedy, "greedy_score": greedy_score, "kept": greedy or rescued,
                                "kept_score": 0.8 if rescued else greedy_score if greedy else 0.3, "revised": greedy,
                                "decide_s": 0.1, "draft_s": 1.1, "best_s": 3.0, "revise_s": 1.0, "n": 4}})  # fmt: skip
    return recs


def test_the_ladder_climbs_a_doubted_draft_to_best_of_n_before_it_defers():
    from rpra.benchmarks.report import evaluate

    res = evaluate(_ladder_records(), quality="exact", route_on="p_pass", threshold=0.5, n_boot=30)
    ladder, cascade = res["routers"]["ladder: draft, best-of-4 if doubted, then defer"], res["routers"]["cascade: probe, then verifier"]
    # At 0.5: the 20 obvious misses deferred at once, the 40 easy drafts kept, the 40 doubted ones
    # climb; 30 picks are trusted and right, 10 are doubted still and deferred.
    assert ladder["drafted_share"] == pytest.approx(0.8) and ladder["climbed_share"] == pytest.approx(0.4)
    assert ladder["remote_share_at_threshold"] == pytest.approx(0.3) and ladder["quality_at_threshold"] == pytest.approx(10.0)
    assert ladder["local_s_per_request"] == pytest.approx((20 * 0.1 + 80 * 1.1 + 40 * 3.0) / 100)
    assert cascade["remote_share_at_threshold"] == pytest.approx(0.6)  # without the rung, every doubted draft is deferred
    assert ladder["apgr"]["value"] > cascade["apgr"]["value"] and ladder["apgr"]["ci"][0] <= ladder["apgr"]["value"] <= ladder["apgr"]["ci"][1]
    table = res["policies"]["side_by_side"]
    at40 = table["ladder: draft, best-of-4 if doubted, then defer"]["at_share_0.4"]
    assert at40["quality"] == pytest.approx(10.0) and at40["share"] <= 0.4
    assert table["cascade: probe, then verifier"]["at_share_0.4"]["quality"] < 10.0
    assert table["PA threshold routing (probe)"]["at_quality"]["share"] > at40["share"]


def test_the_allocation_is_chosen_on_the_calibration_split_and_run_on_the_test_items():
    from rpra.benchmarks.policies import ALLOCATION, allocation_policy
    from rpra.benchmarks.report import evaluate

    # Calibration: the same three kinds, with their outcomes per action (10 right, 1 wrong).
    p = [0.05] * 20 + [0.9] * 40 + [0.5] * 40
    right = lambda xs: [10.0 if x else 1.0 for x in xs]  # noqa: E731
    calibration = {"p_pass": p, "items": 100, "fit_on": 500, "suites": {"s": 100},
                   "outcomes": {"answer": right([False] * 20 + [True] * 40 + [False] * 40),
                                "best-of-4": right([False] * 20 + [True] * 40 + [True] * 30 + [False] * 10),
                                "revise": right([False] * 20 + [True] * 40 + [False] * 40), "defer": right([True] * 100)},
                   "seconds": {"answer": [1.1] * 100, "best-of-4": [3.1] * 100, "revise": [2.1] * 100, "defer": [0.1] * 100}}  # fmt: skip
    _, actions, share = allocation_policy(calibration, 0.0)
    assert share == 1.0 and set(actions) == {"defer"}  # a free remote: everything deferred
    _, actions, share = allocation_policy(calibration, 5.0)
    assert share == pytest.approx(0.2) and actions[-1] == "answer" and "best-of-4" in actions
    res = evaluate(_ladder_records(), quality="exact", route_on="p_pass", threshold=0.5, calibration=calibration, n_boot=30)
    row, alloc = res["routers"][ALLOCATION], res["policies"]["allocation"]
    assert alloc["chosen"]["calibration_share"] <= 0.4 and alloc["chosen"]["price"] < 5.0  # the lowest price within the budget
    assert row["remote_share_at_threshold"] == pytest.approx(0.2)
    assert row["quality_at_threshold"] == pytest.approx((20 * 10 + 40 * 10 + 30 * 10 + 10 * 1) / 100)
    assert row["local_s_per_request"] == pytest.approx((20 * 0.1 + 40 * 1.1 + 40 * 3.1) / 100)


def test_the_best_of_n_journal_resumes_and_skips_a_cut_line(tmp_path):
    from rpra.benchmarks.best_of_n import _read_journal, committed_rows

    journal = tmp_path / "j.jsonl"
    journal.write_text(json.dumps({"id": "a", "right": [True]}) + "\n" + '{"id": "b", "ri')
    done = {}
    offset = _read_journal(journal, done, 0)
    assert list(done) == ["a"] and offset == len(json.dumps({"id": "a", "right": [True]})) + 1
    with journal.open("a") as f:
        f.write('ght": [false]}\n')
    _read_journal(journal, done, offset)  # the line finished since: read now
    assert done["b"] == {"id": "b", "right": [False]}
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps({"key": "k1", "rows": [{"id": "a"}]}))
    args = {"sha": "s", "n": 4, "temperature": 0.7, "max_tokens": 48, "verifier": None}
    assert committed_rows(saved, "k1", **args) == [{"id": "a"}] and committed_rows(saved, "k2", **args) == []
