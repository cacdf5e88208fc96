"""Real HTTP servers on 127.0.0.1 that answer like an OpenAI-compatible API, well or badly.

Not mocks: the client under test goes through real sockets, real chunked encoding and real
timeouts, so what passes here passes against a real server. Each ``StubServer`` runs one
behaviour in a daemon thread on a free port and records every request it receives:

    with StubServer("status_then_ok", failures=2) as server:
        RemoteModel(server.url, retries=2).complete(...)
        assert len(server.requests) == 3

Behaviours: ok_stream, status_500, status_then_ok, garbage, garbage_sse, hang, drop_mid_stream,
unauthorized.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BEHAVIOURS = (
    "ok_stream", "status_500", "status_then_ok", "garbage", "garbage_sse", "hang", "drop_mid_stream", "unauthorized",
)  # fmt: skip
PROMPT_TOKENS = 11  # what ok_stream reports as the prompt's token count

HTML_PAGE = "<!DOCTYPE html><html><head><title>Welcome to nginx!</title></head><body><h1>Welcome</h1></body></html>"


@dataclass
class Received:
    """One request as the server saw it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, or None


class StubServer:
    """One behaviour on ``http://127.0.0.1:<port>``; ``url`` is the API base (``.../v1``).

    Options: ``deltas`` (the streamed answer), ``usage`` (send a usage chunk), ``failures`` and
    ``status`` / ``retry_after`` (status_then_ok), ``drop_after`` and ``chunked``
    (drop_mid_stream), ``lines`` (garbage_sse), ``hang_seconds`` (hang; released on stop),
    ``ignore_stream`` (ok_stream answers in one JSON piece even when asked to stream), ``delay``
    (ok_stream waits that long before answering: a slow first token) and ``pause`` (ok_stream
    waits that long after the first piece of text: a stream that stalls once it has started).
    """

    def __init__(
        self,
        behaviour: str,
        *,
        deltas: tuple[str, ...] = ("Hel", "lo", ",", " world"),
        usage: bool = True,
        failures: int = 2,
        status: int = 500,
        retry_after: str | None = None,
        drop_after: int = 2,
        chunked: bool = True,
        lines: tuple[str, ...] = ("data: this is not json",),
        hang_seconds: float = 10.0,
        ignore_stream: bool = False,
        delay: float = 0.0,
        pause: float = 0.0,
    ):
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"Unknown behaviour {behaviour!r}; one of {', '.join(BEHAVIOURS)}.")
        self.behaviour = behaviour
        self.deltas, self.usage = list(deltas), usage
        self.failures_left, self.status, self.retry_after = failures, status, retry_after
        self.drop_after, self.chunked = drop_after, chunked
        self.lines, self.hang_seconds = list(lines), hang_seconds
        self.ignore_stream = ignore_stream
        self.delay, self.pause = delay, pause
        self.requests: list[Received] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def root(self) -> str:
        """``http://127.0.0.1:<port>`` without ``/v1``."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    @property
    def posts(self) -> list[Received]:
        """The chat requests (health checks left out)."""
        return [r for r in self.requests if r.method == "POST"]

    def start(self) -> StubServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.stub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()  # wake hanging handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)
            self._httpd = None

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling (runs in the server's threads) ------------------------------------------

    def handle(self, h: _Handler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self._lock:
            self.requests.append(Received(h.command, h.path, headers, body))
        getattr(self, f"_{self.behaviour}")(h, body or {})

    def _ok_stream(self, h: _Handler, body: dict) -> None:
        if h.command == "POST" and self.delay:
            self._released.wait(self.delay)
        if h.command == "GET":
            _send_json(h, 200, {"object": "list", "data": [{"id": "default", "object": "model"}]})
        elif body.get("stream") and not self.ignore_stream:
            self._send_stream(h)
        else:
            _send_json(h, 200, self._completion())

    def _status_500(self, h: _Handler, body: dict) -> None:
        _send_json(h, 500, {"error": {"message": "The server had an error", "type": "server_error"}})

    def _status_then_ok(self, h: _Handler, body: dict) -> None:
        with self._lock:
            fail = self.failures_left > 0
            self.failures_left -= fail
        if not fail:
            return self._ok_stream(h, body)
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
        _send_json(h, self.status, {"error": {"message": "overloaded", "type": "server_error"}}, headers)

    def _garbage(self, h: _Handler, body: dict) -> None:
        _send(h, 200, "text/html", HTML_PAGE.encode())

    def _garbage_sse(self, h: _Handler, body: dict) -> None:
        _send(h, 200, "text/event-stream", "".join(line + "\n\n" for line in self.lines).encode())

    def _hang(self, h: _Handler, body: dict) -> None:
        self._released.wait(self.hang_seconds)
        h.close_connection = True

    def _drop_mid_stream(self, h: _Handler, body: dict) -> None:
        self._start_sse(h)
        for chunk in self._chunks()[1 : 1 + self.drop_after]:
            self._write_event(h, chunk)
        # Close without the chunked terminator (or, close-delimited, without [DONE]).
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)

    def _unauthorized(self, h: _Handler, body: dict) -> None:
        # Real APIs echo (part of) the key they got; echoing all of it tests the client's redaction.
        key = h.headers.get("Authorization", "").removeprefix("Bearer ")
        message = f"Incorrect API key provided: {key}." if key else "You didn't provide an API key."
        _send_json(h, 401, {"error": {"message": message, "type": "invalid_request_error"}})

    # -- the OpenAI wire format -----------------------------------------------------------------

    def _chunks(self) -> list[dict]:
        def chunk(choices: list, **extra: Any) -> dict:
            return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "stub", "choices": choices, **extra}

        return [
            chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
            *(chunk([{"index": 0, "delta": {"content": d}, "finish_reason": None}]) for d in self.deltas),
            chunk([{"index": 0, "delta": {"content": None}, "finish_reason": None}]),  # null content happens
            chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        ]

    def _usage(self) -> dict:
        n = len(self.deltas)
        return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}

    def _send_stream(self, h: _Handler) -> None:
        self._start_sse(h)
        chunks = self._chunks()
        for i, chunk in enumerate(chunks):
            self._write_event(h, chunk)
            if i == 1:
                self._write(h, b": keep-alive\n\n")  # a comment line, as servers send while busy
                if self.pause:
                    self._released.wait(self.pause)
        if self.usage:
            # OpenAI's last chunk with stream_options.include_usage: no choices, just the counts.
            last = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": self._usage()}
            self._write_event(h, last)
        self._write(h, b"data: [DONE]\n\n")
        if self.chunked:
            h.wfile.write(b"0\r\n\r\n")

    def _completion(self) -> dict:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "stub",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(self.deltas)}, "finish_reason": "stop"}
            ],
            **({"usage": self._usage()} if self.usage else {}),
        }

    def _start_sse(self, h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        if self.chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:  # the body ends when the connection closes
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()

    def _write_event(self, h: _Handler, chunk: dict) -> None:
        self._write(h, f"data: {json.dumps(chunk)}\n\n".encode())

    def _write(self, h: _Handler, data: bytes) -> None:
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        h.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hanging handler must not block shutdown
    stub: StubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gives up (timeout, garbage detected) resets its connection: expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked encoding, like real API servers
    server: _Server

    def do_GET(self) -> None:
        self.server.stub.handle(self)

    def do_POST(self) -> None:
        self.server.stub.handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


def _send(h: BaseHTTPRequestHandler, status: int, content_type: str, data: bytes, headers: dict | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        h.send_header(name, value)
    h.end_headers()
    h.wfile.write(data)


def _send_json(h: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict | None = None) -> None:
    _send(h, status, "application/json", json.dumps(payload).encode(), headers)
