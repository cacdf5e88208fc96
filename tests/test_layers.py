"""Intermediate layers captured during the prefill, and generated tokens' log-probabilities, on the
real SmolLM2 GGUF through llama.cpp; oracles: transformers on the same GGUF, and a separate
llama.cpp instance that keeps every position's logits."""

from __future__ import annotations

import numpy as np
import pytest

from rpra import prompts
from rpra.errors import ConfigError, ModelError
from rpra.local import Generated, LocalModel
from rpra.predictors import make_slot
from rpra.runtime import Runtime

pytestmark = pytest.mark.slow

LAYERS = (0, 10, 20, 29)  # first, middle, late, and the last (which llama.cpp computes for output rows only)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = "Explain in a few sentences why the sky is blue during the day and red at sunset. " * 8


@pytest.fixture(scope="module")
def capturing(model_path):
    """Captures LAYERS over the whole prompt (no prefix reuse), in one batch of up to 256 tokens."""
    model = LocalModel(model_path, n_ctx=1024, n_threads=2, capture_layers=LAYERS, capture_tokens=None)
    yield model
    model.close()


@pytest.fixture(scope="module")
def long_prompt(capturing) -> list[int]:
    tokens = capturing.chat_tokens([{"role": "user", "content": LONG}])[:150]
    assert len(tokens) == 150
    return tokens


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def test_captured_layers_match_transformers_on_the_same_gguf(capturing, model_path):
    """llama.cpp runs the Q4_1 weights, transformers the same GGUF dequantised to fp32: close, not equal."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokens = capturing.chat_tokens([{"role": "user", "content": "Why is the sky blue, and what do sunsets have to do with it?"}])
    with capturing.lock:
        session = capturing.session(tokens)
    rows = session._layer_rows
    last, mean = session.layer_states("last"), session.layer_states("mean")

    reference = transformers.AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    # hidden_states[i + 1] is block i's output, except the final entry, which has the output norm
    # applied: block 29's raw output (llama.cpp's l_out-29) is read with a hook instead.
    hooked = {}
    reference.model.layers[29].register_forward_hook(lambda module, args, output: hooked.update(out=output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        out = reference(torch.tensor([tokens]), output_hidden_states=True)
    expected = {i: out.hidden_states[i + 1][0].numpy() for i in LAYERS[:-1]} | {29: hooked["out"][0].numpy()}

    for layer in LAYERS:
        assert correlation(last[layer], expected[layer][-1]) > 0.99, layer
        relative = np.linalg.norm(last[layer] - expected[layer][-1]) / np.linalg.norm(expected[layer][-1])
        assert relative < 0.1, layer
    for layer in LAYERS[:-1]:  # every token's row, in order
        assert rows[layer].shape == (len(tokens), capturing.n_embd)
        assert min(correlation(a, b) for a, b in zip(rows[layer], expected[layer])) > 0.99, layer
        assert correlation(mean[layer], expected[layer].mean(axis=0)) > 0.99, layer
    assert 29 not in mean and rows[29].shape == (1, capturing.n_embd)  # output rows only
    assert correlation(last[10], expected[20][-1]) < correlation(last[10], expected[10][-1])  # the layers are told apart


def test_a_prompt_longer_than_a_micro_batch_is_captured_whole(capturing, long_prompt, model_path):
    small = LocalModel(model_path, n_ctx=1024, n_threads=2, n_batch=64, capture_layers=LAYERS, capture_tokens=None)
    try:
        with small.lock:
            pieces = small.session(long_prompt)
    finally:
        small.close()
    with capturing.lock:
        whole = capturing.session(long_prompt)
    for layer in LAYERS[:-1]:  # 64 + 64 + 22 rows, in token order
        assert pieces._layer_rows[layer].shape == (150, capturing.n_embd)
        np.testing.assert_allclose(pieces._layer_rows[layer], whole._layer_rows[layer], rtol=1e-4, atol=1e-3)
    assert pieces._layer_rows[29].shape[0] == 3  # one output row per llama batch; the last is the prompt's
    for layer in LAYERS:
        np.testing.assert_allclose(pieces.layer_states("last")[layer], whole.layer_states("last")[layer], rtol=1e-4, atol=1e-3)


def test_capture_leaves_the_turns_prediction_and_greedy_answer_unchanged(capturing, local_model, greedy_settings):
    results = []
    for model in (local_model, capturing):
        with model.lock:
            model.clear_cache()  # the same prefill from an empty cache for both
        results.append(Runtime(greedy_settings(threshold=0.0), local=model).ask(QUESTION))
    plain, captured = results
    assert captured.answered_by == plain.answered_by == "local" and captured.answer
    assert captured.answer == plain.answer
    np.testing.assert_allclose(captured.prediction.probs, plain.prediction.probs, atol=1e-6)


def test_only_the_prefill_is_captured(capturing):
    tap = capturing._tap
    with capturing.lock:
        session = capturing.session(capturing.chat_tokens(QUESTION) + capturing.tokenize(prompts.SLOT_OPEN["pa"]))
        before = session.layer_states("mean")
        session.score(make_slot(capturing, 10))
        session.commit(capturing.tokenize("7]]\n"))
        out = Generated()
        list(session.generate(12, temperature=0.0, out=out))
    assert out.tokens > 1
    assert not tap._rows  # the slot's branches and the answer: nothing copied
    assert all(np.array_equal(before[layer], state) for layer, state in session.layer_states("mean").items())
    assert session._layer_rows[0].shape[0] == session.prompt_tokens


def test_last_tokens_are_exact_under_prefix_reuse(capturing, long_prompt, model_path):
    """The default keeps prefix reuse: the evaluated tail (capture_tokens) is read, the cached prefix is not."""
    with capturing.lock:
        cold = capturing.session(long_prompt)
    reusing = LocalModel(model_path, n_ctx=1024, n_threads=2, capture_layers=LAYERS, capture_tokens=4)
    try:
        with reusing.lock:
            reusing.session(long_prompt[:120])
            warm = reusing.session(long_prompt)
    finally:
        reusing.close()
    assert warm.reused_tokens == 120  # 30 tokens evaluated; the last 4 rows kept
    assert warm._layer_rows[0].shape == (4, capturing.n_embd) and warm._layer_rows[29].shape == (1, capturing.n_embd)
    for pool in ("last", "last-k"):
        expected = cold.layer_states(pool, k=4)
        got = warm.layer_states(pool, k=4)
        assert got.keys() == expected.keys() == (set(LAYERS) if pool == "last" else set(LAYERS[:-1]))
        for layer in got:
            np.testing.assert_allclose(got[layer], expected[layer], rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="capture_tokens=None"):
        warm.layer_states("mean")
    with pytest.raises(ValueError, match="capture_tokens=5"):
        warm.layer_states("last-k", k=5)


def test_a_failed_read_is_raised_after_the_prefill_not_swallowed(capturing, monkeypatch):
    def broken(tensor):
        raise RuntimeError("no copy")

    tokens = capturing.chat_tokens(QUESTION)
    with capturing.lock:
        monkeypatch.setattr(capturing._tap, "_read", broken)
        with pytest.raises(ModelError, match="no copy"):
            capturing.session(tokens)
        monkeypatch.undo()
        assert capturing.session(tokens).layer_states()[10].shape == (capturing.n_embd,)


def test_capture_of_a_layer_the_model_lacks_is_refused(model_path):
    with pytest.raises(ConfigError, match="0 to 29"):
        LocalModel(model_path, n_ctx=256, n_threads=1, capture_layers=[30])


def test_a_model_without_capture_has_no_layer_states(local_model):
    with local_model.lock:
        session = local_model.session(local_model.chat_tokens(QUESTION))
    with pytest.raises(ValueError, match="capture_layers"):
        session.layer_states()


def test_generated_logprobs_are_each_greedy_tokens_full_softmax(local_model, model_path):
    """Oracle: the same sequence in a separate llama.cpp instance that keeps every position's logits."""
    import llama_cpp

    prompt = local_model.chat_tokens(QUESTION)
    out = Generated()
    with local_model.lock:
        local_model.clear_cache()  # the prompt in one batch, as the reference evaluates it
        session = local_model.session(prompt)
        list(session.generate(16, temperature=0.0, out=out))
        answer = session.tokens[len(prompt) :]
    assert out.tokens == len(answer) == len(out.logprobs) > 3
    assert all(lp <= 0 for lp in out.logprobs)

    ref = llama_cpp.Llama(str(model_path), n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    try:
        # As generate() evaluates it: the prompt in one batch, then one token at a time (a single
        # batch would differ by rounding, up to ~0.2 here).
        ref.eval(prompt)
        for token in answer[:-1]:
            ref.eval([token])
        logits = ref.scores[len(prompt) - 1 : len(prompt) - 1 + len(answer)].astype(np.float64)
    finally:
        ref.close()
    top = logits.max(axis=1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    # Greedy at temperature 0 with no repeat penalty: each token is the step's most probable one.
    assert answer == list(log_softmax.argmax(axis=1))
    np.testing.assert_allclose(out.logprobs, log_softmax.max(axis=1), atol=1e-4)


def test_draft_states_are_the_same_generated_or_committed(capturing):
    """The verifier's features at run time (states watched while the answer is generated token by
    token) are those training reads (the recorded answer committed in one batch)."""
    tokens = capturing.chat_tokens(QUESTION)
    with capturing.lock:
        session = capturing.session(tokens + capturing.tokenize("Rating: [["))
        session.rewind(len(tokens))
        session.watch_states()
        out = Generated()
        for _ in session.generate(12, temperature=0.0, out=out):
            pass
        generated = session.watched_states()
        answer = session.tokens[len(tokens):]
        assert len(answer) == out.tokens > 0
        session = capturing.session(tokens + capturing.tokenize("Rating: [["))
        session.rewind(len(tokens))
        session.watch_states()
        session.commit(answer)
        committed = session.watched_states()
    assert sorted(generated) == sorted(committed) == [0, 10, 20]  # the last layer holds the output row only
    for layer in generated:
        assert correlation(generated[layer], committed[layer]) > 0.999
        assert np.abs(generated[layer] - committed[layer]).max() < 0.05 * np.abs(committed[layer]).max()
    # The states move with the answer: another answer's mean is not the same.
    with capturing.lock:
        session = capturing.session(tokens + capturing.tokenize("Rating: [["))
        session.rewind(len(tokens))
        session.watch_states()
        session.commit(capturing.tokenize("I do not know, sorry."))
        other = session.watched_states()
    assert correlation(other[20], committed[20]) < 0.999


def test_watching_needs_a_capturing_model(local_model):
    with local_model.lock:
        session = local_model.session(local_model.chat_tokens(QUESTION))
        with pytest.raises(ValueError, match="captures no layers"):
            session.watch_states()
        with pytest.raises(ValueError, match="No states are watched"):
            session.watched_states()
