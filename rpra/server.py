"""`rpra serve`: the self-deferral runtime behind the OpenAI chat API.

    client ─► browser guard, auth, size limit, validation ─► admission ─► worker thread: Runtime.turn ─► events ─► JSON or SSE
                                                │                 (holds the local model only while it predicts
                                                └─ 429 when full   or answers locally; a deferral releases it)

One device model serves every request, so requests take turns on it (``LocalModel.lock``), which
keeps their llama.cpp state apart. Admission bounds how many may wait for it: past
``max_queue`` waiting, the server answers 429 at once rather than letting a queue grow without
end. A request that is deferred leaves the local queue the moment the decision is made, so
remote answers stream in parallel with a local one; a request forced to the remote never joins it.

Each turn runs in a thread of its own (llama.cpp and the remote client block) and hands its
events to the event loop; a client that goes away sets the turn's cancel flag, and the thread
closes the turn at the next event, which releases the local model and logs the turn as
interrupted.

Any web page the user visits can make their browser send requests to a server on their
machine, so the server refuses what only a page would send (see ``_browser_refusal``); pages
listed in ``allowed_origins`` are let in and get CORS headers.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from rpra import openai_api as api
from rpra.config import Settings
from rpra.errors import ConfigError, InputError, PrivacyError, PromptTooLongError, RemoteError, RpraError
from rpra.runtime import Decided, Finished, Notice, Runtime, Text

# Requests in flight of any kind (local ones are bounded by max_queue as well): a flood of
# forced-remote requests must not exhaust threads or sockets either.
MAX_IN_FLIGHT = 64
_OPEN_PATHS = {"/health"}  # reachable without the API key or the browser guard (load balancers, HEALTHCHECK)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything, so treat it as exposed


def check_bind(settings: Settings) -> None:
    """Refuse to serve off loopback without an API key: safe by default."""
    if not is_loopback(settings.host) and not settings.server_api_key:
        raise ConfigError(
            f"Binding {settings.host} exposes the server to the network, so it needs an API key: set "
            "RPRA_SERVER_API_KEY (or server_api_key in the config), or bind 127.0.0.1."
        )


class Admission:
    """Counts requests: all in flight, and those waiting for or holding the local model."""

    def __init__(self, max_queue: int):
        self.local_capacity = 1 + max_queue  # one holding the model, max_queue waiting
        self.local = 0
        self.in_flight = 0
        self._lock = threading.Lock()

    def enter(self, *, needs_local: bool) -> bool:
        with self._lock:
            if self.in_flight >= MAX_IN_FLIGHT or (needs_local and self.local >= self.local_capacity):
                return False
            self.in_flight += 1
            self.local += needs_local
            return True

    def leave_local(self) -> None:
        with self._lock:
            self.local -= 1

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


class Metrics:
    """Prometheus metrics of one app (its own registry, so tests can run several apps)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rpra_requests", "Chat completion requests by HTTP status.", ["status"], registry=r)
        self.turns = Counter(
            "rpra_turns", "Finished turns by route (the decision) and who answered (differs on a fallback).",
            ["route", "answered_by"], registry=r,
        )  # fmt: skip
        self.remote_errors = Counter("rpra_remote_errors", "Deferred requests the remote failed to answer.", registry=r)
        self.deferral_share = Gauge("rpra_deferral_share", "Share of finished turns routed to the remote since start.", registry=r)
        self.latency = Histogram(
            "rpra_request_duration_seconds", "Request latency by route.", ["route"], registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
        )  # fmt: skip
        self.first_token = Histogram(
            "rpra_time_to_first_token_seconds", "Time to the first answer text, by route.", ["route"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
        )  # fmt: skip
        self.decision = Histogram(
            "rpra_decision_duration_seconds", "Time to the routing decision (queueing included).", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
        )  # fmt: skip
        self.queue = Gauge("rpra_local_queue", "Requests waiting for or holding the local model.", registry=r)
        self.in_flight = Gauge("rpra_in_flight", "Requests in flight.", registry=r)
        self.pool_turns = Counter("rpra_pool_turns", "Turns routed over the pool, by the target chosen.", ["target"], registry=r)
        self.pool_spend = Counter("rpra_pool_spend", "What the pool's turns cost at its prices since start.", ["target"], registry=r)
        self.pool_budget_left = Gauge("rpra_pool_budget_left", "What the pool may still spend (the tighter of its day and "
                                      "month budgets); -1 without a budget.", registry=r)  # fmt: skip
        self._routes = {"local": 0, "remote": 0}

    def finished(self, result, seconds: float) -> None:
        route = result.decision.route
        self.turns.labels(route, result.answered_by or "none").inc()
        self.latency.labels(route).observe(seconds)
        if result.remote_error:
            self.remote_errors.inc()
        self._routes[route] += 1
        self.deferral_share.set(self._routes["remote"] / sum(self._routes.values()))
        if result.pool:
            self.pool_turns.labels(result.pool["target"]).inc()
            self.pool_spend.labels(result.pool["target"]).inc(result.pool.get("cost") or 0.0)


class TurnWorker:
    """Runs one ``Runtime.turn`` in a thread, handing its events to the event loop.

    The thread does its own admission bookkeeping (leaving the local queue on a deferral, and
    everything when it ends), so a slot is freed even if no one reads the events any more.
    """

    _END = object()

    def __init__(self, runtime: Runtime, messages: list[dict], mode: str, *, admission: Admission, needs_local: bool):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._args = (runtime, messages, mode)
        self._loop = asyncio.get_running_loop()
        self._admission = admission
        self._holds_local = needs_local
        self._thread = threading.Thread(target=self._run, name="rpra-turn", daemon=True)

    def start(self) -> TurnWorker:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the server stopped): no one will read on
            self.cancelled.set()

    def _leave_local(self) -> None:
        if self._holds_local:
            self._holds_local = False
            self._admission.leave_local()

    def _run(self) -> None:
        runtime, messages, mode = self._args
        turn = runtime.turn(messages, mode=mode, source="serve")
        try:
            for event in turn:
                if isinstance(event, Decided) and event.decision.route == "remote":
                    self._leave_local()  # deferred: no longer waiting for the local model
                self._put(event)
                if self.cancelled.is_set():
                    turn.close()  # releases the local model; the turn is logged as interrupted
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which answers with it
            self._put(exc)
        finally:
            self._leave_local()
            self._admission.leave()
            self._put(self._END)

    async def events(self) -> AsyncIterator:
        """The turn's events, in order; an exception the turn raised is raised here."""
        while True:
            item = await self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


async def _watch_disconnect(request: Request, worker: TurnWorker) -> None:
    """Cancel the turn if the client of a non-streaming request goes away while it waits."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            worker.cancel()
            return


def create_app(runtime: Runtime) -> FastAPI:
    """The ASGI app serving ``runtime`` (its settings give limits, key and names)."""
    s = runtime.settings
    app = FastAPI(title="rpra", summary="Self-deferral runtime: OpenAI-compatible chat completions.", docs_url=None, redoc_url=None)
    admission = Admission(s.max_queue)
    metrics = Metrics()
    store = runtime.store

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if s.server_api_key and request.url.path not in _OPEN_PATHS:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), s.server_api_key.encode()):
                _log(request, 401, error="missing or wrong API key")
                return _error(401, "Missing or wrong API key: send 'Authorization: Bearer <RPRA_SERVER_API_KEY>'.", "authentication_error")
        return await call_next(request)

    def _fail(request: Request, exc: BaseException, mode: str, stream: bool) -> JSONResponse:
        """Log a failed turn and answer with its status; anything but an Exception goes on up."""
        status, kind = _status_of(exc)
        _log(request, status, mode=mode, stream=stream, error=str(exc))
        if not isinstance(exc, Exception):
            raise exc
        return _error(status, _client_message(exc, runtime), kind)

    def _log(request: Request, status: int, **fields) -> None:
        if request.url.path == "/v1/chat/completions":
            metrics.requests.labels(str(status)).inc()
        if store is not None:
            client = request.client.host if request.client else None
            store.log_request(client=client, method=request.method, path=request.url.path, status=status, **fields)

    # Middleware added later runs first: the guard, then CORS (whose preflights carry no API key), then auth.
    origins = frozenset(o.strip().rstrip("/").lower() for o in s.allowed_origins.split(",") if o.strip())
    if origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=sorted(origins), allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-rpra-mode"], expose_headers=["*"],
        )  # fmt: skip

    @app.middleware("http")
    async def guard_browsers(request: Request, call_next):
        if request.url.path not in _OPEN_PATHS and (refused := _browser_refusal(request, origins, loopback=is_loopback(s.host))):
            status, message = refused
            _log(request, status, error=message)
            return _error(status, message, "invalid_request_error")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": s.model,
            "remote_configured": runtime.remote is not None,
            "privacy": s.privacy,
            "mode": s.mode,
            "in_flight": admission.in_flight,
            "local_queue": admission.local,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue.set(admission.local)
        metrics.in_flight.set(admission.in_flight)
        if runtime.pool is not None:
            left = runtime.budget_left()
            metrics.pool_budget_left.set(-1.0 if left is None else left)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        ids = ["rpra", "rpra-local"] + (["rpra-remote"] if runtime.remote is not None else [])
        return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "rpra"} for i in ids]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        try:
            raw = await _read_limited(request, s.max_request_bytes)
            body = api.parse_request(raw)
            mode = body.mode(request.headers.get("x-rpra-mode"))
            messages = body.runtime_messages()
        except _TooLarge as exc:
            _log(request, 413, error=str(exc))
            return _error(413, str(exc), "invalid_request_error", "request_too_large")
        except InputError as exc:
            _log(request, 400, error=str(exc))
            return _error(400, str(exc), "invalid_request_error")
        if mode == "remote-only" and runtime.remote is None:
            why = "this server never defers (privacy = never-defer)" if s.privacy == "never-defer" else "no remote is configured"
            _log(request, 403 if s.privacy == "never-defer" else 400, mode=mode, error=why)
            return _error(403 if s.privacy == "never-defer" else 400, f"Cannot answer remotely: {why}.", "invalid_request_error")

        limits = {"max_tokens": min(body.max_completion_tokens or body.max_tokens or s.max_tokens, s.max_tokens)}
        if body.temperature is not None:
            limits["temperature"] = body.temperature
        try:
            configured = runtime.configured(**limits)  # the settings' own validation, as for the CLI
        except ConfigError as exc:
            _log(request, 400, mode=mode, stream=body.stream, error=str(exc))
            return _error(400, str(exc), "invalid_request_error")
        needs_local = mode != "remote-only"
        if not admission.enter(needs_local=needs_local):
            _log(request, 429, mode=mode, stream=body.stream, error="busy")
            return _error(429, "The device model is busy; retry shortly.", "rate_limit_error", headers={"Retry-After": "1"})
        worker = TurnWorker(configured, messages, mode, admission=admission, needs_local=needs_local).start()
        events = worker.events()
        # Everything up to the decision happens before the response starts, so errors still get
        # a proper status and the decision can travel in the headers.
        try:
            decided = None
            async for event in events:
                if isinstance(event, Decided):
                    decided = event
                    break
            if decided is None:
                raise RuntimeError("the turn ended without a decision")
        except BaseException as exc:
            worker.cancel()
            return _fail(request, exc, mode, body.stream)
        metrics.decision.observe(time.perf_counter() - started)
        rid = api.new_id()
        route = decided.decision.route
        model_name = s.model if route == "local" else s.remote_model

        async def finish(result) -> None:
            metrics.finished(result, time.perf_counter() - started)
            _log(request, 200, mode=mode, stream=body.stream, turn_id=result.turn_id,
                 duration_ms=round((time.perf_counter() - started) * 1000, 2))  # fmt: skip

        if not body.stream:
            watcher = asyncio.create_task(_watch_disconnect(request, worker))
            try:
                result = None
                first = True
                async for event in events:
                    if isinstance(event, Text) and first:
                        metrics.first_token.labels(route).observe(time.perf_counter() - started)
                        first = False
                    if isinstance(event, Finished):
                        result = event.result
            except BaseException as exc:
                worker.cancel()
                return _fail(request, exc, mode, False)
            finally:
                watcher.cancel()
            if result is None:  # the client went away and the turn was stopped
                _log(request, 499, mode=mode, stream=False, error="client disconnected")
                return Response(status_code=499)
            await finish(result)
            headers = {**api.decision_headers(result.decision, result.prediction, result.turn_id), "X-RPRA-Answered-By": result.answered_by}
            answered = s.model if result.answered_by == "local" else s.remote_model
            return JSONResponse(api.completion(result, model=answered, rid=rid), headers=headers)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[str]:
            logged = False
            try:
                yield api.chunk(rid, model_name, delta={"role": "assistant", "content": ""},
                                extra={"rpra": api.decision_fields(decided.decision, decided.prediction)})  # fmt: skip
                first = True
                async for event in events:
                    if isinstance(event, Text):
                        if first:
                            metrics.first_token.labels(route).observe(time.perf_counter() - started)
                            first = False
                        yield api.chunk(rid, model_name, delta={"content": event.text})
                    elif isinstance(event, Notice):
                        yield api.chunk(rid, model_name, extra={"rpra": {"notice": event.message}})
                    elif isinstance(event, Finished):
                        await finish(event.result)
                        logged = True
                        yield api.final_chunks(event.result, rid=rid, model=model_name, include_usage=include_usage)
            except Exception as exc:  # after the headers: the error travels as an event (OpenAI's way)
                status, kind = _status_of(exc)
                _log(request, status, mode=mode, stream=True, error=str(exc))
                logged = True
                yield f"data: {json.dumps(api.error_body(_client_message(exc, runtime), kind))}\n\n"
            finally:  # also on disconnect (this task is cancelled): stop the turn, which frees its slot
                worker.cancel()
                if not logged:  # nginx's code for "the client closed the connection"
                    _log(request, 499, mode=mode, stream=True, error="client disconnected mid-stream",
                         duration_ms=round((time.perf_counter() - started) * 1000, 2))  # fmt: skip

        # Answered-By is the plan here; a fallback is reported in the last chunk.
        headers = {**api.decision_headers(decided.decision, decided.prediction, None), "X-RPRA-Answered-By": route, "Cache-Control": "no-cache"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return app


def _browser_refusal(request: Request, origins: frozenset[str], *, loopback: bool) -> tuple[int, str] | None:
    """Why a request that a web page may have sent is refused (status and message), or None.

    A page can make the browser POST to this server without a CORS preflight (a form, or a
    fetch() with Content-Type text/plain), and the turn would run, and could be deferred to the
    paid remote, though the page never reads the answer. After DNS rebinding, the page's own
    name points at 127.0.0.1 and its requests are not even cross-origin. So, as local model
    servers do (Ollama's OLLAMA_ORIGINS): a browser's Origin must be allowed, a loopback server
    answers only to a loopback Host name, and a POST must declare a JSON body, which a page can
    only send to another origin after a preflight. Clients that are not browsers send no Origin;
    OpenAI clients send application/json (curl -d sends a form type, and is told what to send).
    """
    origin = request.headers.get("origin")
    if origin is not None and "*" not in origins and origin.lower() not in origins:
        return 403, (
            f"Requests from web pages at {origin} are refused: add that origin to allowed_origins "
            "(RPRA_ALLOWED_ORIGINS, comma-separated) to let them in."
        )
    host = request.headers.get("host", "").lower()
    host = host[1 : host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host  # the name, without the port
    if loopback and host and not is_loopback(host):
        return 403, (
            f"Host {host!r} is not a name of this machine, and a server bound to loopback answers only to "
            "localhost, 127.0.0.1 or [::1] (a web page may have pointed its own name here). Behind a local "
            "proxy, have it send Host: 127.0.0.1."
        )
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if request.method == "POST" and media_type != "application/json":
        return 415, f"The body must be JSON sent with 'Content-Type: application/json'; got {media_type or 'no Content-Type'}."
    return None


class _TooLarge(Exception):
    pass


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(f"The request body is {int(declared)} bytes; this server accepts at most {limit} (max_request_bytes).")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise _TooLarge(f"The request body exceeds {limit} bytes (max_request_bytes).")
    return bytes(data)


def _client_message(exc: Exception, runtime: Runtime) -> str:
    """What an API client is told about a failed turn.

    The runtime's messages are written for the CLI; an over-long prompt's advice names flags
    (``--set n_ctx``, ``--mode remote-only``) that mean nothing to a client, so it gets the
    request fields that do the same. Anything that is not an RpraError is a bug of ours, and its
    text stays in the server's log.
    """
    if isinstance(exc, PromptTooLongError):
        size = f" ({runtime.local.n_ctx} tokens)" if runtime.local else ""
        if runtime.remote is not None:
            instead = ', or have the remote answer it: send model "rpra-remote", or "rpra_mode": "remote"'
        else:
            instead = " (this server has no remote to send it to)"
        return f"The conversation does not fit the device model's context{size}. Shorten it{instead}."
    return str(exc) if isinstance(exc, RpraError) else "internal error"


def _status_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, asyncio.CancelledError):  # the client went away (or the server stops)
        return 499, "client_closed_request"
    if isinstance(exc, PrivacyError):
        return 403, "invalid_request_error"
    if isinstance(exc, InputError):
        return 400, "invalid_request_error"
    if isinstance(exc, RemoteError):
        return 502, "upstream_error"
    return 500, "server_error"


def _error(status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(api.error_body(message, kind, code), status_code=status, headers=headers)


def serve(runtime: Runtime, *, ready=None) -> None:
    """Serve until interrupted. ``ready(url)`` is called once the socket listens."""
    import socket

    import uvicorn

    s = runtime.settings
    check_bind(s)
    family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((s.host, s.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"Cannot listen on {s.host}:{s.port}: {exc.strerror}. Pick another --port (0 picks a free one).") from None
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(runtime), log_level="warning", timeout_graceful_shutdown=5, access_log=False)
    server = uvicorn.Server(config)
    if ready:
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        ready(f"http://{shown}:{port}/v1")
    server.run(sockets=[sock])
