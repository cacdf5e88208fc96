"""Best-of-N: the selection rules (pure), and N answers decoded as parallel sequences in one
llama.cpp batch on the real SmolLM2 GGUF."""

from __future__ import annotations

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
