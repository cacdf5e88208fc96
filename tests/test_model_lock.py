"""Taking turns on the device model: ModelLock (unit) and answers stepping aside for predictions (real model)."""

from __future__ import annotations

import threading
import time

import pytest

from rpra.local import ModelLock
from rpra.runtime import Decided, Finished, Runtime, Text


def _waiter(lock: ModelLock, order: list, name: str, *, urgent: bool) -> threading.Thread:
    def run() -> None:
        lock.acquire(urgent=urgent)
        order.append(name)
        lock.release()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _settle(lock: ModelLock, waiting: int) -> None:
    """Wait until ``waiting`` threads wait on ``lock`` (so their arrival order is the one intended)."""
    deadline = time.time() + 5
    while len(lock._queue) + lock._urgent < waiting:
        assert time.time() < deadline, "a waiter never arrived"
        time.sleep(0.005)


def test_urgent_waiters_go_before_earlier_plain_ones_and_plain_ones_keep_their_order():
    lock, order = ModelLock(), []
    lock.acquire()
    threads = []
    for waiting, (name, urgent) in enumerate((("answer-1", False), ("answer-2", False), ("predict", True)), start=1):
        threads.append(_waiter(lock, order, name, urgent=urgent))
        _settle(lock, waiting)
    assert lock.urgent_waiting() and lock.contended()
    lock.release()
    for t in threads:
        t.join(5)
    assert order == ["predict", "answer-1", "answer-2"]
    assert not lock.contended() and not lock.locked()


def test_release_from_another_thread_and_misuse_is_an_error():
    lock = ModelLock()
    lock.acquire()
    threading.Thread(target=lock.release).start()
    assert lock.acquire(urgent=True)  # freed by the other thread
    lock.release()
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()


@pytest.mark.slow
def test_a_suspended_answer_resumes_exactly(local_model):
    def answer(interrupt: str | None) -> str:
        local_model._llm.reset()  # the same prefill each time: prefix reuse changes rounding
        session = local_model.session(local_model.chat_tokens([{"role": "user", "content": "Tell me about the moon."}]))
        pieces = []
        for i, piece in enumerate(session.generate(40, temperature=0.0, repeat_penalty=1.1)):
            pieces.append(piece)
            if interrupt and i in (2, 11):
                saved = session.suspend()
                other = local_model.session(local_model.chat_tokens([{"role": "user", "content": interrupt}]))
                assert "".join(other.generate(6, temperature=0.0))  # the other request really ran
                session.resume(saved)
        return "".join(pieces)

    assert answer("Write a poem about cats.") == answer(None)


@pytest.mark.slow
def test_a_prediction_does_not_wait_for_an_answer_in_progress(greedy_settings, local_model, remote_server):
    from rpra.remote import RemoteModel

    story = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    answerer = Runtime(greedy_settings(threshold=0.0, max_tokens=120), local=local_model)
    local_model._llm.reset()
    alone = answerer.ask(story).answer

    deferrer = Runtime(greedy_settings(threshold=10.5, max_tokens=4), local=local_model, remote=RemoteModel(remote_server.url, model="stand-in"))
    local_model._llm.reset()
    turn = answerer.turn(story)
    pieces, decided_at, texts_when_decided, threads = [], {}, [], []
    for event in turn:
        if isinstance(event, Text):
            pieces.append(event.text)
            if len(pieces) == 3:  # mid-answer: another request arrives and must decide now
                def other() -> None:
                    for e in deferrer.turn([{"role": "user", "content": "Prove the Riemann hypothesis."}]):
                        if isinstance(e, Decided):
                            decided_at["route"] = e.decision.route
                            texts_when_decided.append(len(pieces))
                threads.append(threading.Thread(target=other))
                threads[0].start()
        elif isinstance(event, Finished):
            result = event.result
        time.sleep(0.01)  # a slow reader, as a streaming client is
    threads[0].join(120)
    assert decided_at["route"] == "remote"
    assert texts_when_decided[0] < len(pieces) - 10  # decided long before the story ended
    assert result.answer == alone  # stepping aside changed nothing in the answer
    assert not local_model.lock.locked()


def test_acquire_times_out_without_taking_the_lock():
    lock = ModelLock()
    lock.acquire()
    assert lock.acquire(timeout=0.05) is False and lock.acquire(urgent=True, timeout=0.05) is False
    assert lock.acquire(blocking=False) is False
    assert not lock.contended()
    lock.release()
    assert lock.acquire(timeout=0.05) and lock.locked()
