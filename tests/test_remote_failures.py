"""The turn when the remote is slow, breaks off, is declined or is not there at all.

Real parts: the stub HTTP servers of tests/http_fixtures.py (real sockets that misbehave on
purpose), the SmolLM2 GGUF where a local answer is part of the behaviour, a real SQLite log.
"""

from __future__ import annotations

import pytest

from rpra.errors import ConfigError, PrivacyError
from rpra.remote import RemoteModel
from rpra.runtime import Notice, Runtime, Text
from rpra.store import LogStore

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def stub_remote(url: str, **options) -> RemoteModel:
    return RemoteModel(url, **{"timeout": 5.0, "connect_timeout": 0.5, "retries": 1, "backoff": 0.01, **options})


# -- privacy = ask in mode remote-only, with no device model to fall back on -------------------------


@pytest.mark.parametrize("confirm", [lambda sent: False, None], ids=["declined", "no-one-to-ask"])
def test_a_withheld_deferral_without_a_device_model_is_a_clear_error(greedy_settings, serve, tmp_path, confirm):
    # Issue 12: this crashed with AttributeError ('NoneType' object has no attribute 'lock').
    server = serve("ok_stream")
    store = LogStore(tmp_path / "logs.db")
    settings = greedy_settings(privacy="ask", mode="remote-only")
    runtime = Runtime(settings, local=None, remote=stub_remote(server.url), store=store)
    with pytest.raises(PrivacyError, match="Nothing was sent") as info:
        list(runtime.turn(QUESTION, confirm=confirm))
    assert "privacy allow" in str(info.value) and "remote-only" in str(info.value)  # what to do
    assert server.posts == []
    (row,) = store.turns()
    assert row["status"] == "error" and row["route"] == "local" and "kept on the device" in row["reason"]


# -- no remote configured -----------------------------------------------------------------------------


def test_remote_only_without_a_remote_or_a_device_model_is_a_config_error(greedy_settings):
    with pytest.raises(ConfigError, match="RPRA_REMOTE_URL"):
        Runtime(greedy_settings(mode="remote-only"), local=None, remote=None).ask(QUESTION)


@pytest.mark.slow
def test_no_remote_configured_is_an_intended_set_up_not_a_remote_failure(greedy_settings, local_model):
    events = list(Runtime(greedy_settings(threshold=11.0), local=local_model, remote=None).turn(QUESTION))
    r = events[-1].result
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert len(notices) == 1 and "no remote configured" in notices[0] and "failed" not in notices[0]
    assert "no remote configured" in r.verdict and "remote failed" not in r.verdict
    assert r.answered_by == "local" and r.answer and not r.fallback and r.remote_error is None
    assert r.decision.route == "local" and r.prediction is not None  # the prediction still said "defer"


# -- a remote that does not answer -----------------------------------------------------------------


@pytest.mark.slow
def test_a_hung_remote_is_announced_and_given_up_at_the_deadline(greedy_settings, local_model, serve):
    server = serve("hang", hang_seconds=30.0)
    remote = stub_remote(server.url, timeout=20.0, retries=2, first_token_timeout=3.0)
    events = list(Runtime(greedy_settings(threshold=11.0), local=local_model, remote=remote).turn(QUESTION))
    shown = [e for e in events if isinstance(e, (Notice, Text))]
    assert isinstance(shown[0], Notice) and "waiting for the remote" in shown[0].message  # after ~2 s
    assert isinstance(shown[1], Notice) and "no answer within 3 s" in shown[1].message
    r = events[-1].result
    assert r.fallback and r.answered_by == "local" and r.answer
    assert 2_900 <= r.timings_ms["remote"] < 4_500  # one deadline, not 3 attempts x 20 s


@pytest.mark.slow
@pytest.mark.parametrize("behaviour", ["unauthorized", "status_500", "garbage"])
def test_remote_only_falls_back_to_the_device_model_when_one_is_loaded(greedy_settings, local_model, serve, behaviour):
    server = serve(behaviour)
    r = Runtime(greedy_settings(mode="remote-only"), local=local_model, remote=stub_remote(server.url)).ask(QUESTION)
    assert r.fallback and r.answered_by == "local" and r.answer and server.url in r.remote_error
