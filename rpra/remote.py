"""The remote model: a client for any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama,
llama.cpp's server, ``rpra serve-remote``).

The remote is where rpra sends the requests the device model should not answer, so this client
must fail *cleanly*: a bounded number of retries, a bounded wait, and an error that names the URL
and says what to do. Retrying is only safe before the first piece of text reaches the caller;
after that a retry would repeat the answer, so a mid-stream failure is raised at once.

A streamed answer waits for its first text under one deadline (``first_token_timeout``), across
every connect, retry and backoff: a user looking at an empty screen cares about the total, and
per-read timeouts multiply with retries (3 attempts x 60 s cost 187 s). Once text flows, each gap
is bounded by the read timeout (``timeout``) alone, since a long answer may rightly take minutes.

A ``RemoteModel`` may be shared between threads (the server defers many requests at once):
``last_usage`` and ``last_finish_reason`` describe the most recent call *of the calling thread*.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from rpra.config import mask_urls
from rpra.errors import ConfigError, RemoteError

_NO_REMOTE = (
    "No remote configured: set RPRA_REMOTE_URL (and RPRA_REMOTE_MODEL, RPRA_REMOTE_API_KEY) "
    "or run `rpra serve-remote` for a local stand-in."
)
_MAX_RETRY_AFTER = 30.0  # a server asking for minutes of patience is as good as down
FIRST_TOKEN_TIMEOUT = 20.0  # default for the whole wait for a stream's first text
# What to do when a remote does not answer: waiting longer is rarely the answer.
_UNRESPONSIVE_HINT = (
    "Check that the remote at RPRA_REMOTE_URL is up and not overloaded (`rpra doctor` checks it), or "
    "stay on the device meanwhile with mode local-only (--mode local-only; model rpra-local for rpra serve)"
)
_EXCERPT_CHARS = 200


@dataclass(frozen=True)
class Usage:
    """Token counts of one call. ``estimated``: the server sent none, so the completion count is
    the number of streamed deltas (streaming) or characters / 4 (``complete``), and the prompt
    count is unknown."""

    prompt_tokens: int | None
    completion_tokens: int
    estimated: bool


@dataclass(frozen=True)
class Waiting:
    """Yielded by ``stream(..., waiting_after=s)`` once, when no text has come after ``seconds``,
    so a caller can tell its user that the remote is being waited for."""

    seconds: float


@dataclass
class _Outcome:
    """What one call learnt besides the text; copied to ``last_*`` by the thread that made the
    call (the first piece of a stream is read in a helper thread, see ``_FirstPiece``)."""

    usage: Usage | None = None
    finish_reason: str | None = None


class _Retryable(Exception):
    """A failure that may pass: HTTP 429 / 5xx, or a stream cut before any text."""

    def __init__(self, cause: str, retry_after: float | None = None):
        super().__init__(cause)
        self.retry_after = retry_after


class RemoteModel:
    """Chat with an OpenAI-compatible endpoint.

    ``base_url`` is the API base: ``https://api.openai.com/v1`` and ``https://api.openai.com``
    mean the same thing, because ``/v1`` is appended when the URL does not already end with it.
    ``timeout`` is the longest wait for the server's next byte; ``retries`` the extra attempts
    made on connection errors, timeouts, HTTP 429 and 5xx before any text was delivered.
    ``first_token_timeout`` bounds a stream's whole wait for its first text, all attempts
    together: a dead or hanging remote costs at most that. ``complete`` and ``chat_completion``
    (benchmarks, judges: long answers in one piece) are bounded by ``(retries + 1) * timeout``
    plus the backoff instead.
    """

    def __init__(
        self,
        base_url: str | None,
        *,
        model: str = "default",
        api_key: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 0.5,
        first_token_timeout: float = FIRST_TOKEN_TIMEOUT,
    ):
        if not base_url or not base_url.strip():
            raise ConfigError(_NO_REMOTE)
        url = base_url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"RPRA_REMOTE_URL must start with http:// or https://; got {url!r}.")
        if not url.endswith("/v1"):
            url += "/v1"
        if timeout <= 0 or connect_timeout <= 0 or first_token_timeout <= 0 or retries < 0 or backoff < 0:
            raise ConfigError("Remote timeouts must be positive; retries and backoff cannot be negative.")
        self.base_url = url
        self.model = model
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
        self.first_token_timeout = first_token_timeout
        self._api_key = api_key or None
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()
        self._last = threading.local()  # per-thread results of the latest call

    @property
    def last_usage(self) -> Usage | None:
        """Token counts of this thread's latest call."""
        return getattr(self._last, "usage", None)

    @last_usage.setter
    def last_usage(self, value: Usage | None) -> None:
        self._last.usage = value

    @property
    def last_finish_reason(self) -> str | None:
        """Why this thread's latest answer ended ("stop", "length", ...)."""
        return getattr(self._last, "finish_reason", None)

    @last_finish_reason.setter
    def last_finish_reason(self, value: str | None) -> None:
        self._last.finish_reason = value

    @classmethod
    def from_settings(cls, settings: Any) -> RemoteModel:
        """Build from ``rpra.config.Settings`` (its ``remote_*`` fields)."""
        return cls(
            settings.remote_url,
            model=settings.remote_model,
            api_key=settings.remote_api_key,
            timeout=settings.remote_timeout,
            connect_timeout=min(5.0, settings.remote_timeout),
            retries=settings.remote_retries,
            # getattr: Settings gains this field separately; until then the default applies.
            first_token_timeout=settings.remote_first_token_timeout,
        )

    def __repr__(self) -> str:  # never shows the key
        return f"RemoteModel({self.base_url!r}, model={self.model!r}, api_key={'set' if self._api_key else None})"

    # -- lifecycle ------------------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        # Created on first use, never at import or construction: building a RemoteModel is free.
        # httpx.Client is thread-safe; the lock only stops two threads creating two of them.
        with self._client_lock:
            return self._client or self._new_client()

    def _new_client(self) -> httpx.Client:
        if self._client is None:
            headers = {"Accept": "application/json, text/event-stream"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            self._client = httpx.Client(
                timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout), headers=headers
            )
        return self._client

    def close(self) -> None:
        """Close the connection pool (a later call opens a new one)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public calls ---------------------------------------------------------------------------

    def stream(
        self,
        messages: list[dict],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        waiting_after: float | None = None,
    ) -> Iterator[str | Waiting]:
        """Yield the answer's text deltas as they arrive; then read ``last_usage`` and
        ``last_finish_reason``. With ``waiting_after``, a ``Waiting`` comes first when no text has
        arrived after that many seconds. Raises RemoteError."""
        url = f"{self.base_url}/chat/completions"
        body = self._body(messages, max_tokens, temperature, stream=True)
        started = time.monotonic()
        deadline = started + self.first_token_timeout
        warn_at = None if waiting_after is None else started + waiting_after
        self.last_usage, self.last_finish_reason = None, None
        attempt = 0
        while True:
            outcome = _Outcome()
            pieces = self._attempt(url, body, outcome)
            first = _FirstPiece(pieces)
            try:
                while not first.wait(until=deadline if warn_at is None else min(deadline, warn_at)):
                    if time.monotonic() >= deadline:
                        tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                        raise self._error(
                            f"Remote {url} sent no answer within {self.first_token_timeout:g} s ({tries}). "
                            f"{_UNRESPONSIVE_HINT}; a remote that is just slow needs a larger remote_first_token_timeout."
                        )
                    warn_at = None  # once is enough: the caller shows it, and then waits with the user
                    yield Waiting(round(time.monotonic() - started, 1))
                text = first.result()
                break
            except (httpx.TransportError, _Retryable) as exc:
                attempt += 1
                self._backoff_or_raise(url, attempt, exc, deadline=deadline)
            except httpx.HTTPError as exc:  # e.g. an undecodable body: not something a retry fixes
                raise self._error(f"Remote {url} failed: {_describe(exc, self.timeout)}.") from exc
            finally:
                first.abandon()  # a no-op once the piece came; else the helper closes the attempt
        delivered = 0
        try:
            while text is not None:  # None: the answer ended
                delivered += 1
                yield text
                text = next(pieces, None)
        except (httpx.TransportError, _Retryable) as exc:
            raise self._error(
                f"Remote {url} failed mid-answer, after {delivered} chunks of text: "
                f"{_describe(exc, self.timeout)}. Not retried, because the text so far was "
                "already delivered; ask again."
            ) from exc
        except httpx.HTTPError as exc:
            raise self._error(f"Remote {url} failed: {_describe(exc, self.timeout)}.") from exc
        finally:
            pieces.close()
        self.last_usage = outcome.usage or Usage(None, delivered, estimated=True)
        self.last_finish_reason = outcome.finish_reason

    def complete(
        self, messages: list[dict], *, max_tokens: int | None = None, temperature: float | None = None
    ) -> str:
        """The whole answer in one piece (``stream: false``). Raises RemoteError."""
        return _message_text(self.chat_completion(messages, max_tokens=max_tokens, temperature=temperature))

    def chat_completion(
        self,
        messages: list[dict],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict:
        """The server's whole JSON response to one non-streaming call, for callers that need more
        than the text (``logprobs``, say). ``extra`` adds fields to the request body (``logprobs``,
        ``top_logprobs``, llama.cpp's ``grammar``). The response is checked to hold
        ``choices[0].message``; ``last_usage`` and ``last_finish_reason`` are set as for
        ``complete``. Raises RemoteError."""
        url = f"{self.base_url}/chat/completions"
        body = self._body(messages, max_tokens, temperature, stream=False)
        clash = sorted(set(extra or {}) & {"model", "messages", "stream"})
        if clash:
            raise ValueError(f"extra cannot set {', '.join(clash)}: the client sets them itself.")
        body.update(extra or {})
        attempt = 0
        while True:
            self.last_usage, self.last_finish_reason = None, None
            try:
                response = self._http().post(url, json=body)
                self._check_status(response, url)
                outcome = _Outcome()
                data = self._read_completion(response, url, outcome)
                self.last_usage, self.last_finish_reason = outcome.usage, outcome.finish_reason
                return data
            except (httpx.TransportError, _Retryable) as exc:
                attempt += 1
                self._backoff_or_raise(url, attempt, exc)
            except httpx.HTTPError as exc:
                raise self._error(f"Remote {url} failed: {_describe(exc, self.timeout)}.") from exc

    def health(self, timeout: float = 2.0) -> bool:
        """True when ``GET {base}/models`` answers 200 with JSON; never raises."""
        try:
            response = self._http().get(f"{self.base_url}/models", timeout=timeout)
            response.json()
        except (httpx.HTTPError, ValueError):
            return False
        return response.status_code == 200

    # -- internals ------------------------------------------------------------------------------

    def _body(self, messages: list[dict], max_tokens: int | None, temperature: float | None, *, stream: bool) -> dict:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": stream}
        if stream:
            # Without this OpenAI sends no token counts when streaming. Servers that do not know
            # the option (llama.cpp's included) ignore it.
            body["stream_options"] = {"include_usage": True}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        return body

    def _backoff_or_raise(self, url: str, attempt: int, exc: Exception, *, deadline: float | None = None) -> None:
        """Sleep before retry number ``attempt``, or raise once the retries are spent or the
        sleep would end past ``deadline``."""
        # Exponential backoff with a little jitter, so clients that failed together do not all
        # come back at the same instant; a server's Retry-After is a floor, not a suggestion.
        delay = self.backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, min(retry_after, _MAX_RETRY_AFTER))
        if attempt > self.retries or (deadline is not None and time.monotonic() + delay >= deadline):
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                hint = "Check that the server is up and RPRA_REMOTE_URL is right"
            else:
                hint = _UNRESPONSIVE_HINT
            raise self._error(
                f"Remote {url} failed after {attempt} attempt{'s' if attempt > 1 else ''}: "
                f"{_describe(exc, self.timeout)}. {hint}."
            ) from exc
        time.sleep(delay)

    def _attempt(self, url: str, body: dict, outcome: _Outcome) -> Iterator[str]:
        """One streaming request: its text deltas, the response closed when this is closed."""
        with self._http().stream("POST", url, json=body) as response:
            self._check_status(response, url)
            yield from self._read_stream(response, url, outcome)

    def _check_status(self, response: httpx.Response, url: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        excerpt = _excerpt(_read_some(response))
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}: {excerpt}", retry_after=_retry_after(response))
        if status in (401, 403):
            hint = "check RPRA_REMOTE_API_KEY" if self._api_key else "no API key was sent: set RPRA_REMOTE_API_KEY"
        elif status == 404:
            hint = (
                "check RPRA_REMOTE_URL (the API base, e.g. https://api.openai.com/v1) and "
                f"RPRA_REMOTE_MODEL (now {self.model!r})"
            )
        elif 300 <= status < 400:
            hint = f"it redirects to {response.headers.get('location', '?')}: set RPRA_REMOTE_URL to the final address"
        else:
            hint = "the server rejected the request; its message above says why"
        raise self._error(f"Remote {url} answered HTTP {status}: {excerpt} ({hint}).")

    def _read_stream(self, response: httpx.Response, url: str, outcome: _Outcome) -> Iterator[str]:
        """The text deltas of a server-sent-events answer; fills in ``outcome``."""
        if response.headers.get("content-type", "").startswith("application/json"):
            # Some servers ignore ``stream: true`` and answer in one piece.
            yield _message_text(self._read_completion(response, url, outcome))
            return
        done = False
        for payload in self._sse_data(response, url):
            if payload.strip() == "[DONE]":
                done = True
                break
            chunk = self._json(payload, url)
            if chunk.get("usage"):
                outcome.usage = self._usage(chunk["usage"], url)
            choices = chunk.get("choices")
            if choices is None and chunk.get("usage"):
                continue  # the final usage-only chunk
            if not isinstance(choices, list):
                raise self._not_openai(url, payload)
            if not choices:
                continue
            try:
                choice = choices[0]
                text = (choice.get("delta") or {}).get("content")
                outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
            except AttributeError:
                raise self._not_openai(url, payload) from None
            if text and isinstance(text, str):
                yield text
        if not done and outcome.finish_reason is None:
            # A close-delimited body can end "cleanly" half-way: no [DONE], no finish_reason.
            raise _Retryable("the stream ended before the answer was complete")

    def _sse_data(self, response: httpx.Response, url: str) -> Iterator[str]:
        for line in response.iter_lines():
            if not line or line.startswith(":"):
                continue  # event separator, or a comment / keep-alive ping
            field, _, value = line.partition(":")
            if field == "data":
                yield value[1:] if value.startswith(" ") else value
            elif field not in ("event", "id", "retry"):
                raise self._not_openai(url, line)

    def _read_completion(self, response: httpx.Response, url: str, outcome: _Outcome) -> dict:
        """The JSON of a one-piece answer, checked to hold ``choices[0].message``; fills in ``outcome``."""
        response.read()  # a no-op unless the body is still streaming
        data = self._json(response.text, url)
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
            outcome.finish_reason = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise self._not_openai(url, response.text) from None
        if not isinstance(content, str):
            raise self._not_openai(url, response.text)
        if data.get("usage"):
            outcome.usage = self._usage(data["usage"], url)
        else:
            outcome.usage = Usage(None, (len(content) + 3) // 4, estimated=True)
        return data

    def _json(self, text: str, url: str) -> dict:
        try:
            data = json.loads(text)
        except ValueError:
            raise self._not_openai(url, text) from None
        if not isinstance(data, dict):
            raise self._not_openai(url, text)
        if data.get("error"):
            raise self._error(f"Remote {url} reported an error: {_excerpt(json.dumps(data['error']))}.")
        return data

    def _usage(self, raw: Any, url: str) -> Usage:
        try:
            return Usage(raw.get("prompt_tokens"), int(raw["completion_tokens"]), estimated=False)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise self._not_openai(url, json.dumps(raw)) from None

    def _not_openai(self, url: str, text: str) -> RemoteError:
        return self._error(
            f"Remote {url} did not answer like an OpenAI-compatible API; it sent: {_excerpt(text)}. "
            "Check RPRA_REMOTE_URL: it should be the API base (e.g. https://api.openai.com/v1)."
        )

    def _error(self, message: str) -> RemoteError:
        # Servers may echo the key back in an error body; it must never reach a log or a screen.
        if self._api_key:
            message = message.replace(self._api_key, "[redacted]")
        return RemoteError(mask_urls(message))  # nor the credentials in a URL


class _FirstPiece:
    """Reads the first piece of an attempt in a helper thread, so that the wait for it can end at
    a deadline, or pause to tell the user, whatever the socket does.

    httpx bounds each read, not a total: keep-alive bytes restart the clock, and a read blocked
    before the headers cannot be cut short from the waiting thread. A caller that stops waiting
    leaves the helper to close the attempt when its read returns, at most ``timeout`` later. After
    the first piece, the caller reads on in its own thread (a generator may change threads
    between steps, never run in two at once).
    """

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self._came: queue.Queue = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._abandoned = False
        self._taken: tuple | None = None
        threading.Thread(target=self._read, name="rpra-remote-first-piece", daemon=True).start()

    def _read(self) -> None:
        try:
            item = (next(self._pieces, None), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
            item = (None, exc)
        with self._lock:
            if not self._abandoned:
                self._came.put(item)
                return
        self._pieces.close()  # no one waits any more

    def wait(self, *, until: float) -> bool:
        """True once the first piece (or the attempt's failure) is in; False at ``until``."""
        if self._taken is None:
            try:
                self._taken = self._came.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                return False
        return True

    def result(self) -> str | None:
        """The first piece (None for an answer with no text); raises what the attempt raised."""
        text, exc = self._taken
        if exc is not None:
            raise exc
        return text

    def abandon(self) -> None:
        """Stop waiting: the attempt is closed now, or by the helper once its read returns."""
        with self._lock:
            if self._taken is not None:
                return  # the caller has the piece: the attempt is its to read on or close
            if self._came.empty():
                self._abandoned = True
                return
        self._pieces.close()  # it came just too late; the helper is done with the attempt


def _message_text(data: dict) -> str:
    """The answer's text in a response that ``_read_completion`` accepted."""
    return data["choices"][0]["message"].get("content") or ""


def _read_some(response: httpx.Response, limit: int = 4096) -> str:
    """At most ``limit`` bytes of a body: an error page can be large, and only its start is shown."""
    data = b""
    try:
        for piece in response.iter_bytes():
            data += piece
            if len(data) >= limit:
                break
    except httpx.HTTPError:
        pass  # the status is the news; a body cut short still gives an excerpt
    return data[:limit].decode("utf-8", errors="replace")


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    if not flat:
        return "(empty body)"
    return repr(flat if len(flat) <= _EXCERPT_CHARS else flat[:_EXCERPT_CHARS] + "...")


def _retry_after(response: httpx.Response) -> float | None:
    # Only the delta-seconds form; an HTTP date is rare from APIs and falls back to backoff.
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _describe(exc: Exception, timeout: float) -> str:
    """The cause of a failed attempt, in words."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "could not connect in time (connect timeout)"
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect ({exc})"
    if isinstance(exc, httpx.ReadTimeout):
        return f"no data for {timeout:g} s (read timeout)"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the connection broke ({exc})"
    if isinstance(exc, _Retryable):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
