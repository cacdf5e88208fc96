"""The privacy policies in real turns: what a deferral sends, and when it is not sent at all.

The remote is a recording stub on 127.0.0.1 (tests/http_fixtures.py), so each test sees exactly
what left the device; the device model is the real SmolLM2 through llama.cpp.
"""

from __future__ import annotations

import json

import pytest

from rpra.errors import PrivacyError
from rpra.remote import RemoteModel
from rpra.runtime import Runtime

pytestmark = pytest.mark.slow

SECRET = "Write to ann.lee@example.org about my order."


@pytest.fixture
def runtime(greedy_settings):
    """``runtime(local_model, stub, **settings)``: every auto turn wants to defer (threshold above the scale)."""

    def make(local_model, stub, **settings) -> Runtime:
        return Runtime(greedy_settings(threshold=10.5, **settings), local=local_model, remote=RemoteModel(stub.url, retries=0))

    return make


def test_ask_shows_the_redacted_request_and_a_no_keeps_it_local(runtime, local_model, serve):
    stub = serve("ok_stream")
    shown = []
    rt = runtime(local_model, stub, privacy="ask")
    result = [e for e in rt.turn([{"role": "user", "content": SECRET}], confirm=lambda sent: shown.append(sent) or False)][-1].result
    assert result.answered_by == "local" and "declined" in result.decision.reason and result.decision.route == "local"
    assert stub.posts == [] and result.sent_remote is None
    assert "ann.lee@example.org" not in json.dumps(shown) and "[EMAIL_1]" in json.dumps(shown)


def test_ask_with_a_yes_sends_exactly_what_was_shown(runtime, local_model, serve):
    stub = serve("ok_stream")
    shown = []
    rt = runtime(local_model, stub, privacy="ask")
    result = [e for e in rt.turn([{"role": "user", "content": SECRET}], confirm=lambda sent: shown.append(sent) or True)][-1].result
    assert result.answered_by == "remote"
    assert stub.posts[0].body["messages"] == shown[0] == result.sent_remote


def test_ask_without_anyone_to_ask_stays_local(runtime, local_model, serve):
    stub = serve("ok_stream")
    result = runtime(local_model, stub, privacy="ask").ask([{"role": "user", "content": SECRET}])
    assert result.answered_by == "local" and "no one to ask" in result.decision.reason and stub.posts == []


def test_never_defer_has_no_remote_and_refuses_remote_only(runtime, local_model, serve):
    stub = serve("ok_stream")
    rt = runtime(local_model, stub, privacy="never-defer")
    result = rt.ask([{"role": "user", "content": SECRET}])
    assert result.answered_by == "local" and "never-defer" in result.decision.reason
    with pytest.raises(PrivacyError, match="never-defer"):
        rt.ask([{"role": "user", "content": SECRET}], mode="remote-only")
    assert stub.posts == []


def test_forced_remote_declined_is_answered_locally(runtime, local_model, serve):
    stub = serve("ok_stream")
    rt = runtime(local_model, stub, privacy="ask")
    result = [e for e in rt.turn([{"role": "user", "content": SECRET}], mode="remote-only", confirm=lambda sent: False)][-1].result
    assert result.answered_by == "local" and result.answer and stub.posts == []
    assert not rt.local.lock.locked()


def test_redaction_can_be_turned_off(runtime, local_model, serve):
    stub = serve("ok_stream")
    result = runtime(local_model, stub, redact=False).ask([{"role": "user", "content": SECRET}])
    assert stub.posts[0].body["messages"] == [{"role": "user", "content": SECRET}] and result.redactions == []


def test_redacted_answer_is_restored_and_the_placeholders_explained(runtime, local_model, serve):
    stub = serve("ok_stream", deltas=("Sure, I wrote to ", "[EMAIL", "_1].",))
    result = runtime(local_model, stub).ask([{"role": "user", "content": SECRET}])
    sent = stub.posts[0].body["messages"]
    assert sent[-1] == {"role": "user", "content": "Write to [EMAIL_1] about my order."}
    assert sent[0]["role"] == "system" and "copy the placeholder exactly" in sent[0]["content"]  # before the request, not after it
    assert result.answer == "Sure, I wrote to ann.lee@example.org."
    assert result.redactions == [{"kind": "email", "placeholder": "[EMAIL_1]"}]


def test_chat_asks_before_deferring_and_reads_the_answer_from_the_pipe(rpra, env, serve):
    stub = serve("ok_stream")
    env |= {"RPRA_REMOTE_URL": stub.url, "RPRA_THRESHOLD": "10.5", "RPRA_PRIVACY": "ask"}
    done = rpra("chat", env=env, stdin=f"{SECRET}\nn\n{SECRET}\ny\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("It would send:") == 2 and "[EMAIL_1]" in done.stdout
    assert "declined" in done.stdout and "deferred" in done.stdout
    assert len(stub.posts) == 1 and "ann.lee@example.org" not in json.dumps(stub.posts[0].body)
