"""`rpra serve`: a real server on 127.0.0.1 with the real device model, driven by the `openai` client.

The "remote" is llama-cpp-python's server on the same small model (``remote_server``), or a
recording stub (tests/http_fixtures.py) where a test must see exactly what left the device.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from rpra import openai_api as api
from rpra.config import Settings
from rpra.errors import ConfigError, InputError
from rpra.remote import RemoteModel
from rpra.runtime import Runtime
from rpra.server import MAX_IN_FLIGHT, Admission, check_bind, create_app, is_loopback
from rpra.store import LogStore

# -- unit: the wire format and the guards ----------------------------------------------------------


def test_request_mode_comes_from_header_then_body_then_model_name():
    body = api.parse_request(json.dumps({"model": "rpra-remote", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert body.mode(None) == "remote-only"
    assert body.mode("local") == "local-only"
    with_field = api.parse_request(json.dumps({"model": "rpra-remote", "rpra_mode": "auto", "messages": [{"role": "user", "content": "x"}]}).encode())
    assert with_field.mode(None) == "auto"
    client_default = api.parse_request(json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}).encode())
    assert client_default.mode(None) == "auto"
    with pytest.raises(InputError, match="X-RPRA-Mode"):
        body.mode("sideways")


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"messages": []}', "messages"),
        (b'{"messages": [{"role": "assistant", "content": "hi"}]}', "last message must be the user"),
        (b'{"messages": [{"role": "tool", "content": "hi"}]}', "role"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 3}', "n > 1"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', "tools"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', None),
    ],
)
def test_bad_requests_are_refused_with_a_reason(raw, message):
    if message is None:  # image parts parse, and are refused when the text is taken
        with pytest.raises(InputError, match="image_url"):
            api.parse_request(raw).runtime_messages()
        return
    with pytest.raises(InputError, match=message):
        api.parse_request(raw)


def test_text_parts_and_developer_role_become_plain_messages():
    raw = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert api.parse_request(json.dumps(raw).encode()).runtime_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
    ]


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("::") and not is_loopback("myhost")


def test_binding_off_loopback_needs_an_api_key():
    with pytest.raises(ConfigError, match="RPRA_SERVER_API_KEY"):
        check_bind(Settings(host="0.0.0.0"))
    check_bind(Settings(host="0.0.0.0", server_api_key="k"))
    check_bind(Settings(host="127.0.0.1"))


def test_admission_bounds_the_local_queue_but_not_remote_requests():
    a = Admission(max_queue=1)
    assert a.enter(needs_local=True) and a.enter(needs_local=True)
    assert not a.enter(needs_local=True)  # one holding, one waiting: full
    assert a.enter(needs_local=False)  # a forced-remote request does not queue for the model
    a.leave_local()
    assert a.enter(needs_local=True)
    assert a.in_flight == 4 and a.local == 2
    b = Admission(max_queue=1000)
    assert sum(b.enter(needs_local=False) for _ in range(MAX_IN_FLIGHT + 5)) == MAX_IN_FLIGHT


def test_decision_headers_are_ascii():
    from rpra.controller import Decision

    headers = api.decision_headers(Decision("remote", "auto", "prédit 3.0/10 < 5.0\nnext"), None, 7)
    assert headers["X-RPRA-Reason"].isascii() and "\n" not in headers["X-RPRA-Reason"]
    assert headers["X-RPRA-Turn-Id"] == "7"


def test_the_rpra_field_reports_dropped_messages_and_a_broken_remote_answer():
    from rpra.runtime import TurnResult

    fields = api.result_fields(TurnResult(dropped_messages=2, remote_partial="Hel", fallback=True))
    assert fields["dropped_messages"] == 2 and fields["remote_partial"] == "Hel"


# -- integration: a real server ---------------------------------------------------------------------


@contextlib.contextmanager
def running(runtime: Runtime):
    """Serve ``runtime`` with uvicorn on a free loopback port in a thread; yield the API base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def make_runtime(greedy_settings):
    """``make_runtime(local_model, tmp_path, remote_url=...)``: a runtime logging to tmp_path."""

    def make(local_model, tmp_path, *, remote_url=None, **overrides) -> Runtime:
        settings = greedy_settings(remote_url=remote_url, remote_model="stand-in", remote_retries=0, remote_timeout=20, **overrides)
        remote = RemoteModel.from_settings(settings) if remote_url and settings.privacy != "never-defer" else None
        return Runtime(settings, local=local_model, remote=remote, store=LogStore(tmp_path / "logs.db"))

    return make


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_a_local_answer_with_its_decision_in_headers_and_body(make_runtime, local_model, remote_server, tmp_path):
    runtime = make_runtime(local_model, tmp_path, remote_url=remote_server.url)
    with running(runtime) as url:
        raw = client(url).chat.completions.with_raw_response.create(model="rpra-local", messages=ASK)
        reply = raw.parse()
        assert raw.headers["x-rpra-route"] == "local" and raw.headers["x-rpra-answered-by"] == "local"
        assert 1.0 <= float(raw.headers["x-rpra-expected-score"]) <= 10.0
        assert len(raw.headers["x-rpra-distribution"].split(",")) == 10
        extra = reply.model_extra["rpra"]
        assert extra["answered_by"] == "local" and extra["decision"]["mode"] == "local-only"
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        turn = runtime.store.get_turn(extra["turn_id"])
        assert turn["status"] == "done" and turn["answer"] == reply.choices[0].message.content
        logged = runtime.store.requests()
        assert logged[0]["status"] == 200 and logged[0]["turn_id"] == extra["turn_id"] and logged[0]["mode"] == "local-only"


@pytest.mark.slow
def test_streams_a_local_answer_and_a_deferred_one(make_runtime, local_model, remote_server, tmp_path):
    # threshold above the scale: auto mode defers every request, on the strength of a real prediction
    runtime = make_runtime(local_model, tmp_path, remote_url=remote_server.url, threshold=10.5)
    with running(runtime) as url:
        c = client(url)
        for model, route in (("rpra-local", "local"), ("rpra", "remote")):
            chunks = list(c.chat.completions.create(model=model, messages=ASK, stream=True, stream_options={"include_usage": True}))
            first, last_choice = chunks[0], [ch for ch in chunks if ch.choices][-1]
            assert first.model_extra["rpra"]["decision"]["route"] == route
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            final = last_choice.model_extra["rpra"]
            assert final["answered_by"] == route and last_choice.choices[0].finish_reason in ("stop", "length")
            assert text.strip() == runtime.store.get_turn(final["turn_id"])["answer"] and text.strip()
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
            if route == "remote":
                assert first.model_extra["rpra"]["prediction"]["expected"] < 10.5  # decided by the prediction


@pytest.mark.slow
def test_concurrent_requests_get_their_own_answers(make_runtime, local_model, remote_server, tmp_path):
    runtime = make_runtime(local_model, tmp_path, remote_url=remote_server.url, max_tokens=16)
    prompts = ["Name a colour.", "What is 2 + 2?", "Say hello in French.", "Name a fruit."]
    with running(runtime) as url:
        c = client(url)
        serial = [c.chat.completions.create(model="rpra-local", messages=[{"role": "user", "content": p}]).choices[0].message.content for p in prompts]
        results: dict[int, str] = {}

        def ask(i: int) -> None:
            stream = c.chat.completions.create(model="rpra-local", messages=[{"role": "user", "content": prompts[i]}], stream=True)
            results[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices).strip()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [results.get(i) for i in range(len(prompts))] == serial  # greedy: same answers, none mixed up
    assert len(set(serial)) > 1


@pytest.mark.slow
def test_a_full_queue_answers_429_and_deferred_requests_do_not_wait(make_runtime, local_model, remote_server, tmp_path):
    runtime = make_runtime(local_model, tmp_path, remote_url=remote_server.url, max_queue=0, max_tokens=200)
    with running(runtime) as url:
        c = client(url)
        long_local = c.chat.completions.create(model="rpra-local", messages=[{"role": "user", "content": "Write a long story about a dragon."}], stream=True)
        next(iter(long_local))  # the decision: this request now holds the local model
        with pytest.raises(openai.RateLimitError) as busy:
            c.chat.completions.create(model="rpra-local", messages=ASK)
        assert busy.value.response.headers["retry-after"] == "1"
        started = time.perf_counter()
        deferred = c.chat.completions.create(model="rpra-remote", messages=ASK, max_tokens=8)
        assert deferred.model_extra["rpra"]["answered_by"] == "remote"
        assert httpx.get(f"{url[:-3]}/health").json()["local_queue"] == 1  # the story is still being written
        long_local.close()
        remote_seconds = time.perf_counter() - started
    statuses = [r["status"] for r in runtime.store.requests(limit=10)]
    assert 429 in statuses and remote_seconds < 60


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_frees_its_slot(make_runtime, local_model, remote_server, tmp_path):
    runtime = make_runtime(local_model, tmp_path, remote_url=remote_server.url, max_queue=0, max_tokens=300)
    with running(runtime) as url:
        with httpx.stream(
            "POST", f"{url}/chat/completions", timeout=60,
            json={"model": "rpra-local", "stream": True, "messages": [{"role": "user", "content": "Count from one to two hundred in words."}]},
        ) as response:  # fmt: skip
            lines = response.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any('"content"' in line for line in got)
        # the connection is closed with the answer unfinished; the slot must come back soon
        deadline = time.time() + 30
        while httpx.get(f"{url[:-3]}/health").json()["local_queue"] != 0:
            assert time.time() < deadline, "the disconnected request still holds the local model"
            time.sleep(0.1)
        reply = client(url).chat.completions.create(model="rpra-local", messages=ASK, max_tokens=4)
        assert reply.choices[0].message.content
    interrupted = [t for t in runtime.store.turns(limit=5) if t["status"] == "error"]
    assert interrupted and interrupted[0]["error"] == "interrupted"
    assert [r["status"] for r in runtime.store.requests(limit=5)] == [200, 499]  # newest first


@pytest.mark.slow
def test_when_the_remote_is_down_the_device_answers_and_says_so(make_runtime, local_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # nothing listens once closed
    runtime = make_runtime(local_model, tmp_path, remote_url=dead)
    with running(runtime) as url:
        reply = client(url).chat.completions.create(model="rpra-remote", messages=ASK)
        extra = reply.model_extra["rpra"]
        assert extra["fallback"] is True and extra["answered_by"] == "local" and "could not connect" in extra["remote_error"]
        assert reply.choices[0].message.content
        metrics = httpx.get(f"{url[:-3]}/metrics").text
    assert "rpra_remote_errors_total 1.0" in metrics
    assert 'rpra_turns_total{answered_by="local",route="remote"} 1.0' in metrics


@pytest.mark.slow
def test_oversized_and_malformed_requests_get_4xx_and_the_server_keeps_serving(make_runtime, local_model, tmp_path):
    runtime = make_runtime(local_model, tmp_path, max_request_bytes=4096)
    with running(runtime) as url:
        endpoint = f"{url}/chat/completions"
        big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
        assert httpx.post(endpoint, json=big).status_code == 413
        assert httpx.post(endpoint, content=b"{oops", headers={"content-type": "application/json"}).status_code == 400
        bad = httpx.post(endpoint, json={"messages": [{"role": "user", "content": "hi"}], "temperature": 9})
        assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
        no_remote = httpx.post(endpoint, json={"model": "rpra-remote", "messages": ASK})
        assert no_remote.status_code == 400 and "no remote" in no_remote.json()["error"]["message"]
        digits = " ".join(str(i) for i in range(900))  # ~3,500 bytes, ~3,000 tokens: over the 1,024 context
        too_long = httpx.post(endpoint, json={"model": "rpra-local", "messages": [{"role": "user", "content": digits}]})
        refusal = too_long.json()["error"]["message"]
        assert too_long.status_code == 400 and "context" in refusal and "Shorten" in refusal
        assert "--" not in refusal  # no CLI flags for an API client
        assert httpx.get(f"{url}/models").json()["data"][0]["id"] == "rpra"
        ok = client(url).chat.completions.create(model="rpra-local", messages=ASK, max_tokens=4)
        assert ok.choices[0].message.content
    statuses = sorted(r["status"] for r in runtime.store.requests(limit=10))
    assert statuses == [200, 400, 400, 400, 400, 413]


@pytest.mark.slow
def test_a_prompt_too_long_for_the_device_tells_the_client_how_to_send_it_remotely(make_runtime, local_model, tmp_path, serve):
    runtime = make_runtime(local_model, tmp_path, remote_url=serve("ok_stream").url)
    digits = " ".join(str(i) for i in range(900))  # ~3,000 tokens: over the 1,024 context
    with running(runtime) as url:
        too_long = httpx.post(f"{url}/chat/completions", json={"model": "rpra-local", "messages": [{"role": "user", "content": digits}]})
    refusal = too_long.json()["error"]["message"]
    assert too_long.status_code == 400 and '"rpra-remote"' in refusal and '"rpra_mode": "remote"' in refusal
    assert "--" not in refusal


@pytest.mark.slow
def test_a_stream_that_breaks_mid_answer_shows_the_break_and_logs_what_was_shown(make_runtime, local_model, tmp_path, serve):
    stub = serve("drop_mid_stream", drop_after=2)
    runtime = make_runtime(local_model, tmp_path, remote_url=stub.url)
    with running(runtime) as url:
        chunks = list(client(url).chat.completions.create(model="rpra-remote", messages=ASK, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    before, marker, after = text.partition("broke off")
    assert before.startswith("Hello") and marker and after.strip()  # remote part, a visible break, the local answer
    final = [ch for ch in chunks if ch.choices][-1].model_extra["rpra"]
    assert final["fallback"] is True and final["answered_by"] == "local" and final["remote_partial"] == "Hello"
    assert runtime.store.get_turn(final["turn_id"])["answer"] == text.strip()


@pytest.mark.slow
def test_an_api_key_is_enforced_when_set(make_runtime, local_model, tmp_path):
    runtime = make_runtime(local_model, tmp_path, server_api_key="s3cret")
    with running(runtime) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").chat.completions.create(model="rpra-local", messages=ASK)
        assert httpx.get(f"{url}/models").status_code == 401
        assert httpx.get(f"{url[:-3]}/metrics").status_code == 401
        assert httpx.get(f"{url[:-3]}/health").status_code == 200  # for load balancers
        assert client(url, key="s3cret").chat.completions.create(model="rpra-local", messages=ASK, max_tokens=4).choices
    assert runtime.store.requests(limit=10)[-1]["status"] == 401


@pytest.mark.slow
def test_redaction_is_applied_to_what_the_remote_receives(make_runtime, local_model, tmp_path, serve):
    # The stub streams a placeholder back split across chunks, as a real model's tokens would.
    stub = serve("ok_stream", deltas=("I will write to ", "[EMA", "IL_1", "] and call ", "[PHONE_1]", "."))
    runtime = make_runtime(local_model, tmp_path, remote_url=stub.url)
    prompt = "Email jane.doe@example.com or call +1 415-555-0132 about card 4111 1111 1111 1111."
    with running(runtime) as url:
        chunks = list(client(url).chat.completions.create(model="rpra-remote", messages=[{"role": "user", "content": prompt}], stream=True))
    sent = json.dumps(stub.posts[0].body["messages"])
    for secret in ("jane.doe@example.com", "415-555-0132", "4111 1111 1111 1111"):
        assert secret not in sent
    assert "[EMAIL_1]" in sent and "[PHONE_1]" in sent and "[CARD_1]" in sent
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "I will write to jane.doe@example.com and call +1 415-555-0132."
    final = [ch for ch in chunks if ch.choices][-1].model_extra["rpra"]
    assert {r["kind"] for r in final["redactions"]} == {"email", "phone", "card"}
    turn = runtime.store.get_turn(final["turn_id"])
    assert turn["sent_remote_json"] == stub.posts[0].body["messages"]  # the log records what left
    assert "jane.doe" not in json.dumps(turn["redactions_json"])


@pytest.mark.slow
def test_a_never_defer_server_keeps_everything_local(make_runtime, local_model, tmp_path, serve):
    stub = serve("ok_stream")
    runtime = make_runtime(local_model, tmp_path, remote_url=stub.url, privacy="never-defer", threshold=10.5)
    with running(runtime) as url:
        c = client(url)
        with pytest.raises(openai.PermissionDeniedError):
            c.chat.completions.create(model="rpra-remote", messages=ASK)
        reply = c.chat.completions.create(model="rpra", messages=ASK, max_tokens=4)
    extra = reply.model_extra["rpra"]
    assert extra["answered_by"] == "local" and "never-defer" in extra["decision"]["reason"]
    assert extra["decision"]["route"] == "local" and stub.posts == []


@pytest.mark.slow
def test_metrics_and_health_report_the_traffic(make_runtime, local_model, remote_server, tmp_path):
    runtime = make_runtime(local_model, tmp_path, remote_url=remote_server.url)
    with running(runtime) as url:
        c = client(url)
        c.chat.completions.create(model="rpra-local", messages=ASK, max_tokens=4)
        c.chat.completions.create(model="rpra-remote", messages=ASK, max_tokens=4)
        c.chat.completions.create(model="rpra-remote", messages=ASK, max_tokens=4)
        with contextlib.suppress(openai.BadRequestError):
            c.chat.completions.create(model="rpra", messages=[{"role": "user", "content": "  "}])
        text = httpx.get(f"{url[:-3]}/metrics").text
        health = httpx.get(f"{url[:-3]}/health").json()
    assert 'rpra_requests_total{status="200"} 3.0' in text and 'rpra_requests_total{status="400"} 1.0' in text
    assert "rpra_deferral_share 0.666" in text
    assert 'rpra_request_duration_seconds_count{route="remote"} 2.0' in text
    assert health["status"] == "ok" and health["local_queue"] == 0 and health["in_flight"] == 0


@pytest.mark.slow
def test_rpra_serve_off_loopback_needs_a_key_and_refuses_requests_without_it(model_path, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RPRA_HOME": str(tmp_path / "home"), "RPRA_MAX_TOKENS": "4", "RPRA_N_CTX": "512"}
    env.pop("RPRA_SERVER_API_KEY", None)
    cmd = [sys.executable, "-m", "rpra.cli", "serve", "--host", "0.0.0.0", "--port", str(port), "--model", str(model_path)]
    exposed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert exposed.returncode == 1 and "RPRA_SERVER_API_KEY" in exposed.stderr  # refuses before loading anything
    proc = subprocess.Popen(cmd, env={**env, "RPRA_SERVER_API_KEY": "k3y"}, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health").status_code == 200:  # open, for health checks
                    break
            assert proc.poll() is None and time.time() < deadline, "rpra serve did not come up"
            time.sleep(0.2)
        refused = httpx.post(f"{base}/v1/chat/completions", json={"model": "rpra-local", "messages": ASK})
        assert refused.status_code == 401 and "RPRA_SERVER_API_KEY" in refused.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            client(f"{base}/v1", key="guess").chat.completions.create(model="rpra-local", messages=ASK)
        reply = client(f"{base}/v1", key="k3y").chat.completions.create(model="rpra-local", messages=ASK)
        assert reply.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert f"http://0.0.0.0:{port}/v1" in stderr and "key required" in stderr
    with LogStore(tmp_path / "home" / "logs.db") as store:
        assert [r["status"] for r in store.requests()] == [200, 401, 401]
        assert store.turns()[0]["status"] == "done"


# -- browsers: a web page the user visits can reach a loopback server ---------------------------------

DEFER = {"model": "rpra-remote", "messages": ASK}
EVIL = "http://evil.example"


def preflight(endpoint: str, origin: str) -> httpx.Response:
    """What a browser sends before a cross-origin POST with a JSON body."""
    headers = {"origin": origin, "access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}
    return httpx.options(endpoint, headers=headers)


def test_browser_simple_requests_are_refused_and_nothing_reaches_the_remote(make_runtime, tmp_path, serve):
    # No device model: anything that gets through is forwarded to the (paid) remote.
    stub = serve("ok_stream")
    runtime = make_runtime(None, tmp_path, remote_url=stub.url)
    with running(runtime) as url:
        endpoint, body = f"{url}/chat/completions", json.dumps(DEFER)
        # A form or fetch() without preflight: Content-Type text/plain, from another site.
        simple = httpx.post(endpoint, content=body, headers={"content-type": "text/plain", "origin": EVIL})
        assert simple.status_code == 403 and "allowed_origins" in simple.json()["error"]["message"]
        for content_type in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            refused = httpx.post(endpoint, content=body, headers={"content-type": content_type} if content_type else {})
            assert refused.status_code == 415, content_type
            assert "Content-Type: application/json" in refused.json()["error"]["message"]
        assert httpx.post(endpoint, json=DEFER, headers={"origin": EVIL}).status_code == 403
        assert httpx.get(f"{url}/models", headers={"origin": EVIL}).status_code == 403
        answer = preflight(endpoint, EVIL)
        assert answer.status_code == 403 and not [h for h in answer.headers if h.startswith("access-control-")]
        # DNS rebinding: evil.example now resolves to 127.0.0.1, and the browser calls it same-origin.
        rebound = httpx.post(endpoint, json=DEFER, headers={"host": "evil.example:8080"})
        assert rebound.status_code == 403 and "Host" in rebound.json()["error"]["message"]
        assert httpx.get(f"{url[:-3]}/health", headers={"host": "evil.example", "origin": EVIL}).status_code == 200
        assert stub.posts == []
        assert httpx.post(endpoint, json=DEFER, headers={"host": "[::1"}).status_code == 403  # no name to trust
        for host in ("localhost:1234", "127.0.0.1", "[::1]:80"):
            ok = httpx.post(endpoint, content=body, headers={"content-type": "application/json; charset=utf-8", "host": host})
            assert ok.status_code == 200, host
    assert len(stub.posts) == 3
    statuses = [r["status"] for r in runtime.store.requests(limit=20)][::-1]
    assert statuses == [403, 415, 415, 415, 415, 403, 403, 403, 403, 403, 200, 200, 200]  # /health is not logged


def test_an_allowed_origin_gets_its_answer_with_cors_headers(make_runtime, tmp_path, serve):
    stub = serve("ok_stream")
    settings = {"allowed_origins": "http://localhost:3000, https://chat.example", "server_api_key": "k"}
    runtime = make_runtime(None, tmp_path, remote_url=stub.url, **settings)
    with running(runtime) as url:
        endpoint = f"{url}/chat/completions"
        answer = preflight(endpoint, "http://localhost:3000")  # a preflight carries no API key
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "content-type" in answer.headers["access-control-allow-headers"].lower()
        reply = httpx.post(endpoint, json=DEFER, headers={"origin": "https://chat.example", "authorization": "Bearer k"})
        assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == "https://chat.example"
        assert reply.headers["access-control-expose-headers"] == "*"  # the page may read the X-RPRA-* decision
        assert httpx.post(endpoint, json=DEFER, headers={"origin": "http://localhost:3001", "authorization": "Bearer k"}).status_code == 403
        assert preflight(endpoint, "http://localhost:3001").status_code == 403
    assert len(stub.posts) == 1


def test_any_origin_with_a_star_and_any_host_off_loopback(make_runtime, tmp_path, serve):
    stub = serve("ok_stream")
    runtime = make_runtime(None, tmp_path, remote_url=stub.url, allowed_origins="*", host="0.0.0.0", server_api_key="k")
    with running(runtime) as url:
        headers = {"origin": EVIL, "host": "rpra.internal:8080", "authorization": "Bearer k"}
        assert httpx.post(f"{url}/chat/completions", json=DEFER, headers=headers).status_code == 200
    assert len(stub.posts) == 1


def test_allowed_origins_must_be_origins():
    with pytest.raises(ConfigError, match="http://localhost:3000"):
        Settings(allowed_origins="localhost:3000")
    Settings(allowed_origins=" http://localhost:3000 ,*")


@pytest.mark.slow
def test_a_checked_draft_is_streamed_only_when_kept(greedy_settings, model_path, remote_server, tmp_path):
    """With a verifier, the server starts the response after the draft's check: a doubted draft
    is never sent, the remote's answer is, and the rpra field says a draft was made and discarded."""
    from rpra.local import LocalModel
    from tests.test_cascade import CASCADE, LAYER, verifier

    capturing = LocalModel(model_path, n_ctx=1024, n_threads=2, seed=0, capture_layers=[LAYER])
    try:
        for bias, route in ((5.0, "local"), (-5.0, "remote")):
            settings = greedy_settings(remote_url=remote_server.url, remote_model="stand-in", remote_retries=0, remote_timeout=20, **CASCADE)
            runtime = Runtime(settings, local=capturing, remote=RemoteModel.from_settings(settings), store=LogStore(tmp_path / f"{route}.db"),
                              verifier=verifier(capturing.n_embd, bias=bias))  # fmt: skip
            with running(runtime) as url:
                raw = client(url).chat.completions.with_raw_response.create(model="rpra", messages=ASK, stream=True)
                assert raw.headers["x-rpra-route"] == route and raw.headers["x-rpra-decided-at"] == "draft"
                chunks = list(raw.parse())
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                final = [ch for ch in chunks if ch.choices][-1].model_extra["rpra"]
                assert final["answered_by"] == route and final["decision"]["point"] == "draft"
                assert final["draft_discarded"] is (route == "remote") and final["draft_prediction"]["predictor"] == "verifier"
                assert [r["rung"] for r in final["rungs"]] == ["draft"]
                turn = runtime.store.get_turn(final["turn_id"])
                assert text.strip() == turn["answer"] and text.strip()
                assert turn["answered_by"].startswith(f"{route}:")
    finally:
        capturing.close()
