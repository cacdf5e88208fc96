"""The turn's control flow, fast: a small fake device model and remote stand in for llama.cpp and
HTTP, so every path through ``Runtime.turn`` runs in milliseconds.

What is checked is the runtime's own logic: the model's lock is released on every path (answer,
deferral, a consumer that walks away, an error), the privacy policy keeps what it must on the
device, a prompt too long for the local context is deferred, a failing remote falls back to a
flagged local answer. The real-model tests (test_runtime.py, test_bad_input.py) remain the oracles
for the same behaviours on llama.cpp.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rpra.config import Settings
from rpra.errors import PrivacyError, PromptTooLongError, RemoteError
from rpra.local import Generated, ModelLock
from rpra.prediction import Prediction
from rpra.predictors import Predictor
from rpra.remote import Usage
from rpra.runtime import Decided, Finished, Notice, Runtime, Text

ASK = [{"role": "user", "content": "What is 2 + 2?"}]


class FakeSession:
    """A sequence in a fake context: generation replays the model's scripted answer."""

    def __init__(self, model: FakeModel, tokens: list[int]):
        self.model, self.tokens = model, list(tokens)
        self.prompt_tokens, self.reused_tokens = len(tokens), 0

    def extend(self, text: str) -> None:
        self.tokens += self.model.tokenize(text)

    def commit(self, tokens) -> None:
        self.tokens += list(tokens)

    def rewind(self, position: int) -> None:
        assert position is not None and position <= len(self.tokens), "the answer rewinds to the slot the runtime marked"
        self.tokens = self.tokens[:position]

    def generate(self, max_tokens: int, *, temperature: float, repeat_penalty: float = 1.0, stop=None, out: Generated | None = None) -> Iterator[str]:
        out = out if out is not None else Generated()
        assert self.model.lock.locked(), "the model is used without its lock"
        words = self.model.answer.split(" ")
        out.finish_reason = "length" if len(words) > max_tokens else "stop"
        for i, word in enumerate(words[:max_tokens]):
            piece = word if i == 0 else " " + word
            out.text += piece
            out.tokens += 1
            yield piece

    def suspend(self):
        return list(self.tokens)

    def resume(self, saved) -> None:
        self.tokens = saved


class FakeModel:
    """What the runtime needs of ``LocalModel``: a lock, a tokenizer (one token per character),
    a context size, sessions."""

    def __init__(self, *, answer: str = "Four, of course.", n_ctx: int = 512):
        self.lock = ModelLock()
        self.answer, self.n_ctx = answer, n_ctx
        self.sessions = 0

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        return [t for m in messages for t in self.tokenize(f"<{m['role']}>{m['content']}")]

    def session(self, prompt, *, reserve: int = 0) -> FakeSession:
        assert self.lock.locked(), "a session is opened without the lock"
        if len(prompt) + reserve > self.n_ctx:
            raise PromptTooLongError(f"The prompt is {len(prompt)} tokens; the context holds {self.n_ctx}.")
        self.sessions += 1
        return FakeSession(self, prompt)


class FixedPredictor(Predictor):
    """Predicts the same score for every request (or raises ``error``)."""

    name = "fixed"

    def __init__(self, score: int, error: Exception | None = None):
        self.score, self.error = score, error

    def predict(self, session, slot, *, pass_mark: int) -> Prediction:
        if self.error is not None:
            raise self.error
        probs = [0.0] * 10
        probs[self.score - 1] = 1.0
        return Prediction(tuple(probs), pass_mark, self.name)


class FakeRemote:
    """Streams ``pieces``, then raises ``fail`` if given; records what it was sent and whether
    the local model was free meanwhile."""

    def __init__(self, pieces=("Remote", " answer."), fail: Exception | None = None, local: FakeModel | None = None):
        self.pieces, self.fail, self.local = pieces, fail, local
        self.sent: list[list[dict]] = []
        self.local_was_locked: list[bool] = []
        self.last_finish_reason, self.last_usage = "stop", Usage(prompt_tokens=7, completion_tokens=2, estimated=False)

    def stream(self, messages, **kwargs) -> Iterator[str]:
        self.sent.append(messages)
        if self.local is not None:
            self.local_was_locked.append(self.local.lock.locked())
        if self.fail is not None:
            raise self.fail
        yield from self.pieces

    def close(self) -> None:
        pass


def runtime(*, score: int = 8, local: FakeModel | None = None, remote: FakeRemote | None = None, predictor=None, **settings) -> Runtime:
    values = dict(threshold=5.0, temperature=0.0, max_tokens=16, log=False, redact=False)
    values.update(settings)
    local = local if local is not None else FakeModel()
    return Runtime(Settings(**values), local=local, remote=remote, predictor=predictor or FixedPredictor(score))


def drain(rt: Runtime, messages=ASK, **kw) -> tuple[list, object]:
    events = list(rt.turn(messages, **kw))
    return events, events[-1].result


def test_a_local_answer_releases_the_lock_and_reports_the_decision_first():
    rt = runtime(score=8)
    events, result = drain(rt)
    assert isinstance(events[0], Decided) and events[0].decision.route == "local"
    assert "".join(e.text for e in events if isinstance(e, Text)) == "Four, of course."
    assert result.answered_by == "local" and not rt.local.lock.locked()


def test_a_consumer_that_stops_after_the_decision_or_mid_answer_frees_the_model():
    for stop_after in (1, 2):  # the Decided event; the first piece of text
        rt = runtime(score=8)
        events = rt.turn(ASK)
        for _ in range(stop_after):
            next(events)
        assert rt.local.lock.locked()
        events.close()
        assert not rt.local.lock.locked()


def test_a_predictor_that_raises_frees_the_model():
    rt = runtime(predictor=FixedPredictor(5, error=RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        drain(rt)
    assert not rt.local.lock.locked()


def test_a_deferral_releases_the_model_before_the_remote_answers():
    local = FakeModel()
    remote = FakeRemote(local=local)
    events, result = drain(runtime(score=2, local=local, remote=remote))
    assert result.answered_by == "remote" and result.answer == "Remote answer."
    assert remote.local_was_locked == [False]  # other requests could use the device meanwhile
    assert remote.sent == [[{"role": "user", "content": "What is 2 + 2?"}]] == [result.sent_remote]


def test_a_failing_remote_falls_back_to_a_flagged_local_answer_and_frees_the_model():
    local = FakeModel()
    rt = runtime(score=2, local=local, remote=FakeRemote(fail=RemoteError("HTTP 500"), local=local))
    events, result = drain(rt)
    assert result.fallback and result.answered_by == "local" and "HTTP 500" in result.remote_error
    assert any(isinstance(e, Notice) and "answering locally" in e.message for e in events)
    assert result.answer == "Four, of course." and not local.lock.locked()


def test_without_a_remote_a_low_prediction_is_answered_locally_and_not_called_a_failure():
    events, result = drain(runtime(score=2, remote=None))
    assert result.decision.route == "local" and "no remote configured" in result.decision.reason
    assert result.answered_by == "local" and not result.fallback and result.remote_error is None


def test_a_prompt_too_long_for_the_device_goes_to_the_remote_in_auto_mode():
    local = FakeModel(n_ctx=40)
    long = [{"role": "user", "content": "x" * 100}]
    events, result = drain(runtime(local=local, remote=FakeRemote(local=local)), long)
    assert result.decision.route == "remote" and "does not fit the local context" in result.decision.reason
    assert result.prediction is None and result.answered_by == "remote" and not local.lock.locked()


def test_a_prompt_too_long_for_the_device_is_refused_in_local_only_mode():
    local = FakeModel(n_ctx=40)
    with pytest.raises(PromptTooLongError):
        drain(runtime(local=local, remote=FakeRemote(), mode="local-only"), [{"role": "user", "content": "x" * 100}])
    assert not local.lock.locked()


def test_never_defer_refuses_remote_only_and_sends_nothing():
    remote = FakeRemote()
    rt = runtime(remote=remote, privacy="never-defer")
    with pytest.raises(PrivacyError):  # remote-only asked for per request (the settings refuse it up front)
        drain(rt, mode="remote-only")
    assert remote.sent == [] and not rt.local.lock.locked()


def test_never_defer_keeps_a_low_prediction_on_the_device():
    remote = FakeRemote()
    events, result = drain(runtime(score=2, remote=remote, privacy="never-defer"))
    assert result.answered_by == "local" and "never-defer" in result.decision.reason
    assert remote.sent == []


def test_privacy_ask_sends_only_after_a_yes_and_keeps_the_turn_local_after_a_no():
    remote = FakeRemote()
    rt = runtime(score=2, remote=remote, privacy="ask")
    asked = []
    _, declined = drain(rt, confirm=lambda sent: asked.append(sent) or False)
    assert declined.answered_by == "local" and "declined" in declined.decision.reason and remote.sent == []
    _, nobody = drain(rt)  # no one to ask (a server): stays local
    assert nobody.answered_by == "local" and "no one to ask" in nobody.decision.reason and remote.sent == []
    _, accepted = drain(rt, confirm=lambda sent: True)
    assert accepted.answered_by == "remote" and len(remote.sent) == 1
    assert asked == [[{"role": "user", "content": "What is 2 + 2?"}]]  # exactly what would have been sent
    assert not rt.local.lock.locked()


def test_predict_stops_at_the_decision_without_answering_or_sending():
    remote = FakeRemote()
    rt = runtime(score=2, remote=remote)
    decided = rt.predict(ASK, mode="auto")
    assert decided.decision.route == "remote" and decided.prediction.expected == pytest.approx(2.0)
    assert remote.sent == [] and not rt.local.lock.locked()


def test_finished_is_the_last_event_of_every_turn():
    for score in (2, 8):
        events, _ = drain(runtime(score=score, remote=FakeRemote()))
        assert isinstance(events[-1], Finished) and sum(isinstance(e, Finished) for e in events) == 1


def test_a_rating_line_the_model_writes_itself_is_not_shown_or_kept():
    events, result = drain(runtime(score=8, local=FakeModel(answer="Rating: [[8]]\nFour, of course.")))
    assert "".join(e.text for e in events if isinstance(e, Text)) == "Four, of course." == result.answer


def test_an_answer_that_only_starts_like_a_rating_is_shown_whole():
    for answer in ("Scores of people came.", "Rating: 8 out of 10 is what critics gave it.", "Four."):
        events, result = drain(runtime(score=8, local=FakeModel(answer=answer)))
        assert result.answer == answer
