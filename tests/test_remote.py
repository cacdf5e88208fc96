"""The remote client against real (stub) HTTP servers on 127.0.0.1, and one real llama.cpp server."""

from __future__ import annotations

import socket
import sys
import time

import pytest
from tests.http_fixtures import PROMPT_TOKENS

from rpra.config import Settings
from rpra.errors import ConfigError, RemoteError
from rpra.remote import RemoteModel, Usage, Waiting
from rpra.remote_server import RemoteServer, run_with_server

MESSAGES = [{"role": "user", "content": "Say hello."}]
KEY = "sk-test-1234567890abcdef"


def fast(url: str, **options) -> RemoteModel:
    """A client with test-sized timeouts: failures show up in well under a second."""
    return RemoteModel(url, **{"timeout": 0.3, "connect_timeout": 0.3, "retries": 2, "backoff": 0.01, **options})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://h:1/v1", "http://h:1/v1"),
        ("http://h:1/v1/", "http://h:1/v1"),
        ("http://h:1", "http://h:1/v1"),
        ("http://h:1/", "http://h:1/v1"),
        ("https://api.example.com/openai//", "https://api.example.com/openai/v1"),
    ],
)
def test_base_url_is_normalised_to_end_in_v1(given, expected):
    assert RemoteModel(given).base_url == expected


def test_from_settings_without_remote_url_is_a_config_error():
    with pytest.raises(ConfigError, match="RPRA_REMOTE_URL"):
        RemoteModel.from_settings(Settings())


def test_from_settings_takes_the_remote_fields():
    settings = Settings(remote_url="http://h:1", remote_model="big", remote_timeout=9.0, remote_retries=4)
    model = RemoteModel.from_settings(settings)
    assert (model.base_url, model.model, model.timeout, model.retries) == ("http://h:1/v1", "big", 9.0, 4)


def test_from_settings_takes_the_first_token_deadline_from_the_settings():
    from rpra.config import Settings

    settings = Settings(remote_url="http://h:1", remote_timeout=9.0, remote_first_token_timeout=3.0)
    remote = RemoteModel.from_settings(settings)
    assert (remote.first_token_timeout, remote.timeout) == (3.0, 9.0)
    assert Settings().remote_first_token_timeout == RemoteModel("http://h:1").first_token_timeout  # one default


def test_repr_hides_the_api_key():
    assert KEY not in repr(RemoteModel("http://h:1", api_key=KEY))


# -- answers --------------------------------------------------------------------------------------


def test_stream_yields_deltas_in_order_and_reads_usage(serve):
    server = serve("ok_stream", deltas=("The", " answer", " is", " 4."))
    model = fast(server.url)
    assert list(model.stream(MESSAGES)) == ["The", " answer", " is", " 4."]
    assert model.last_usage == Usage(PROMPT_TOKENS, 4, estimated=False)
    assert model.last_finish_reason == "stop"


def test_stream_without_usage_chunk_estimates_from_deltas(serve):
    server = serve("ok_stream", deltas=("a", "b", "c"), usage=False)
    model = fast(server.url)
    assert "".join(model.stream(MESSAGES)) == "abc"
    assert model.last_usage == Usage(None, 3, estimated=True)


def test_request_carries_model_messages_options_and_bearer_key(serve):
    server = serve("ok_stream")
    list(fast(server.url, model="big", api_key=KEY).stream(MESSAGES, max_tokens=7, temperature=0.0))
    (request,) = server.posts
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "big"
    assert request.body["messages"] == MESSAGES
    assert (request.body["stream"], request.body["max_tokens"], request.body["temperature"]) == (True, 7, 0.0)


def test_no_key_sends_no_authorization_header(serve):
    server = serve("ok_stream")
    list(fast(server.url).stream(MESSAGES))
    assert "authorization" not in server.posts[0].headers


def test_stream_accepts_a_server_that_ignores_stream_true(serve):
    server = serve("ok_stream", ignore_stream=True)
    model = fast(server.url)
    assert list(model.stream(MESSAGES)) == ["Hello, world"]
    assert model.last_usage == Usage(PROMPT_TOKENS, 4, estimated=False)


def test_complete_returns_the_whole_answer_with_usage(serve):
    server = serve("ok_stream", deltas=("4", "2"))
    model = fast(server.url)
    assert model.complete(MESSAGES) == "42"
    assert server.posts[0].body["stream"] is False
    assert model.last_usage == Usage(PROMPT_TOKENS, 2, estimated=False)
    assert model.last_finish_reason == "stop"


def test_health_is_true_for_a_live_api_and_false_for_a_closed_port(serve):
    assert fast(serve("ok_stream").url).health()
    assert not fast(f"http://127.0.0.1:{free_port()}").health(timeout=0.3)


# -- retries before the first token -----------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503])
def test_transient_errors_are_retried_until_success(serve, status):
    server = serve("status_then_ok", failures=2, status=status)
    assert "".join(fast(server.url, retries=2).stream(MESSAGES)) == "Hello, world"
    assert len(server.posts) == 3


def test_complete_is_retried_too(serve):
    server = serve("status_then_ok", failures=1)
    assert fast(server.url).complete(MESSAGES) == "Hello, world"
    assert len(server.posts) == 2


def test_retry_after_is_honoured(serve):
    server = serve("status_then_ok", failures=1, status=429, retry_after="0.4")
    start = time.monotonic()
    assert fast(server.url, backoff=0.01).complete(MESSAGES) == "Hello, world"
    assert time.monotonic() - start >= 0.4


def test_server_error_forever_gives_up_after_retries_plus_one_attempts(serve):
    server = serve("status_500")
    with pytest.raises(RemoteError) as info:
        list(fast(server.url, retries=3).stream(MESSAGES))
    assert len(server.posts) == 4
    assert server.url in str(info.value) and "HTTP 500" in str(info.value)


def test_connection_refused_is_retried_then_named(serve):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(RemoteError, match="could not connect") as info:
        list(fast(url).stream(MESSAGES))
    assert url in str(info.value) and "3 attempts" in str(info.value)


def test_hanging_server_fails_within_bounded_time(serve):
    server = serve("hang")
    start = time.monotonic()
    with pytest.raises(RemoteError, match="read timeout") as info:
        list(fast(server.url, timeout=0.3, retries=2).stream(MESSAGES))
    elapsed = time.monotonic() - start
    assert len(server.posts) == 3 and "local-only" in str(info.value)  # a hint beyond "raise the timeout"
    assert 0.85 <= elapsed < 2.0  # three 0.3 s timeouts plus tiny backoffs, not the server's 10 s


def test_a_hanging_remote_is_given_up_at_the_first_token_deadline(serve):
    # Issue 12: three attempts of a 60 s read timeout cost 187 s with nothing on screen.
    server = serve("hang", hang_seconds=30.0)
    start = time.monotonic()
    with pytest.raises(RemoteError, match="no answer within 1 s") as info:
        list(fast(server.url, timeout=20.0, retries=3, first_token_timeout=1.0).stream(MESSAGES))
    assert 0.9 <= time.monotonic() - start < 2.0
    assert len(server.posts) == 1  # the one attempt used the whole deadline
    assert "local-only" in str(info.value) and "rpra doctor" in str(info.value)  # what to do, not only "wait longer"


def test_retries_and_their_backoff_share_the_first_token_deadline(serve):
    server = serve("status_then_ok", failures=10, status=503, retry_after="0.4")
    start = time.monotonic()
    with pytest.raises(RemoteError, match="HTTP 503"):
        list(fast(server.url, retries=10, first_token_timeout=1.0).stream(MESSAGES))
    assert time.monotonic() - start < 1.3 and len(server.posts) <= 3  # not 11 attempts, 4 s of Retry-After


def test_a_started_stream_may_pause_longer_than_the_first_token_deadline(serve):
    # The deadline bounds the wait for the first text; gaps after it are bounded by the read timeout.
    server = serve("ok_stream", pause=0.8)
    model = fast(server.url, timeout=3.0, first_token_timeout=0.4)
    assert "".join(model.stream(MESSAGES)) == "Hello, world"
    assert model.last_usage == Usage(PROMPT_TOKENS, 4, estimated=False) and model.last_finish_reason == "stop"


def test_stream_says_once_that_the_remote_is_still_being_waited_for(serve):
    server = serve("ok_stream", delay=0.7)
    items = list(fast(server.url, timeout=3.0).stream(MESSAGES, waiting_after=0.2))
    assert isinstance(items[0], Waiting) and 0.2 <= items[0].seconds < 0.7
    assert items[1:] == ["Hel", "lo", ",", " world"]  # one notice, then the answer
    assert not any(isinstance(i, Waiting) for i in fast(server.url, timeout=3.0).stream(MESSAGES))  # only when asked


def test_stream_cut_before_first_token_is_retried(serve):
    server = serve("drop_mid_stream", drop_after=0)
    with pytest.raises(RemoteError, match="3 attempts"):
        list(fast(server.url).stream(MESSAGES))
    assert len(server.posts) == 3


# -- no retry after text was delivered, nor on client errors -------------------------------------------


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_drop_mid_stream_after_tokens_raises_without_retry(serve, chunked):
    server = serve("drop_mid_stream", drop_after=2, chunked=chunked)
    received = []
    with pytest.raises(RemoteError, match="mid-answer") as info:
        for text in fast(server.url).stream(MESSAGES):
            received.append(text)
    assert received == ["Hel", "lo"]
    assert len(server.posts) == 1
    assert server.url in str(info.value)


def test_unauthorized_is_not_retried_and_points_at_the_key(serve):
    server = serve("unauthorized")
    with pytest.raises(RemoteError, match="RPRA_REMOTE_API_KEY") as info:
        list(fast(server.url, api_key=KEY).stream(MESSAGES))
    assert len(server.posts) == 1
    assert "HTTP 401" in str(info.value)
    # The stub echoes the key in its error body; the client must not pass it on.
    assert KEY not in str(info.value) and "[redacted]" in str(info.value)


def test_not_found_is_not_retried_and_points_at_url_and_model(serve):
    server = serve("status_then_ok", failures=1, status=404)
    with pytest.raises(RemoteError, match="RPRA_REMOTE_URL.*RPRA_REMOTE_MODEL"):
        fast(server.url).complete(MESSAGES)
    assert len(server.posts) == 1


# -- garbage ------------------------------------------------------------------------------------------


def test_html_page_is_not_an_openai_api(serve):
    server = serve("garbage")
    for call in (lambda m: list(m.stream(MESSAGES)), lambda m: m.complete(MESSAGES)):
        with pytest.raises(RemoteError, match="OpenAI-compatible") as info:
            call(fast(server.url))
        assert "Welcome to nginx" in str(info.value) and server.url in str(info.value)
    assert len(server.posts) == 2  # garbage is not retried: the next answer would be garbage too


@pytest.mark.parametrize(
    "line",
    ["data: this is not json", 'data: {"object": "no choices here"}', 'data: {"choices": "not a list"}', "<html>"],
)
def test_garbage_sse_is_not_an_openai_api(serve, line):
    server = serve("garbage_sse", lines=(line,))
    with pytest.raises(RemoteError, match="OpenAI-compatible"):
        list(fast(server.url).stream(MESSAGES))
    assert len(server.posts) == 1


# -- the stand-in server ----------------------------------------------------------------------------


def test_server_command_uses_flags_llama_cpp_server_accepts(tmp_path):
    """Oracle: llama_cpp.server's own argument parser reads back what we pass."""
    pytest.importorskip("llama_cpp.server")
    import argparse

    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings as LlamaSettings

    server = RemoteServer(tmp_path / "m.gguf", port=8123, n_ctx=1024, n_threads=3, model_alias="big")
    parser = argparse.ArgumentParser()
    add_args_from_model(parser, LlamaSettings)
    command = server.command()
    assert command[:3] == [sys.executable, "-m", "llama_cpp.server"]
    args = parser.parse_args(command[3:])
    served, model = parse_model_from_args(ServerSettings, args), parse_model_from_args(ModelSettings, args)
    assert (served.host, served.port) == ("127.0.0.1", 8123)
    assert (model.model, model.n_ctx, model.n_threads, model.model_alias) == (str(tmp_path / "m.gguf"), 1024, 3, "big")
    assert server.url == "http://127.0.0.1:8123/v1"


class _FakeServer:
    """Stands in for RemoteServer in run_with_server: records start/stop, points at a stub."""

    def __init__(self, url: str):
        self.url, self.model_alias, self.calls = url, "stand-in", []

    def start(self):
        self.calls.append("start")

    def stop(self):
        self.calls.append("stop")


def test_run_with_server_exports_the_url_and_always_stops(serve, tmp_path):
    fake = _FakeServer(serve("ok_stream").url)
    out = tmp_path / "env.txt"
    script = (
        "import os, sys; open(sys.argv[1], 'w').write(os.environ['RPRA_REMOTE_URL'] + ' ' + "
        "os.environ['RPRA_REMOTE_MODEL']); sys.exit(3)"
    )
    assert run_with_server(fake, [sys.executable, "-c", script, str(out)]) == 3
    assert out.read_text() == f"{fake.url} stand-in"
    assert fake.calls == ["start", "stop"]


def test_run_with_server_stops_even_when_the_command_cannot_start(serve):
    fake = _FakeServer(serve("ok_stream").url)
    with pytest.raises(ConfigError, match="Cannot run"):
        run_with_server(fake, ["/nonexistent/rpra-test-command"])
    assert fake.calls == ["start", "stop"]


@pytest.mark.slow
def test_server_that_cannot_load_the_model_fails_with_its_log(tmp_path):
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    server = RemoteServer(bogus)
    with pytest.raises(RemoteError, match="exited with code") as info:
        server.start(timeout=60)
    head, _, tail = str(info.value).partition("ends with:")
    assert str(server.log_path) in head and server.log_path.exists()  # kept for the user to read
    assert "broken.gguf" in tail  # the server's own words, not just ours
    assert server._process is None
    server.log_path.unlink()


@pytest.mark.slow
def test_real_llama_cpp_server_streams_an_answer(remote_server):
    with RemoteModel(remote_server.url, model="stand-in", timeout=60.0) as model:
        assert model.health()
        text = "".join(model.stream(MESSAGES, max_tokens=16, temperature=0.0))
        assert text.strip()
        assert model.last_finish_reason in ("stop", "length")
        assert model.last_usage is not None and model.last_usage.completion_tokens > 0
