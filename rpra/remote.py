"""The remote model: a client for any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama,
llama.cpp's server, ``rpra serve-remote``).

The remote is where rpra sends the requests the device model should not answer, so this client
must fail *cleanly*: a bounded number of retries, a bounded wait, and an error that names the URL
and says what to do. Retrying is only safe before the first piece of text reaches the caller;
after that a retry would repeat the answer, so a mid-stream failure is raised at once.

A ``RemoteModel`` may be shared between threads (the server defers many requests at once):
``last_usage`` and ``last_finish_reason`` describe the most recent call *of the calling thread*.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from rpra.errors import ConfigError, RemoteError

_NO_REMOTE = (
    "No remote configured: set RPRA_REMOTE_URL (and RPRA_REMOTE_MODEL, RPRA_REMOTE_API_KEY) "
    "or run `rpra serve-remote` for a local stand-in."
)
_MAX_RETRY_AFTER = 30.0  # a server asking for minutes of patience is as good as down
_EXCERPT_CHARS = 200


@dataclass(frozen=True)
class Usage:
    """Token counts of one call. ``estimated``: the server sent none, so the completion count is
    the number of streamed deltas (streaming) or characters / 4 (``complete``), and the prompt
    count is unknown."""

    prompt_tokens: int | None
    completion_tokens: int
    estimated: bool


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
    made on connection errors, timeouts, HTTP 429 and 5xx before any text was delivered. So a
    dead or hanging remote costs about ``(retries + 1) * timeout`` plus the backoff; only a server
    that keeps trickling bytes without ever finishing can hold a stream open longer.
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
    ):
        if not base_url or not base_url.strip():
            raise ConfigError(_NO_REMOTE)
        url = base_url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"RPRA_REMOTE_URL must start with http:// or https://; got {url!r}.")
        if not url.endswith("/v1"):
            url += "/v1"
        if timeout <= 0 or connect_timeout <= 0 or retries < 0 or backoff < 0:
            raise ConfigError("Remote timeouts must be positive; retries and backoff cannot be negative.")
        self.base_url = url
        self.model = model
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
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
        self, messages: list[dict], *, max_tokens: int | None = None, temperature: float | None = None
    ) -> Iterator[str]:
        """Yield the answer's text deltas as they arrive; then read ``last_usage`` and
        ``last_finish_reason``. Raises RemoteError."""
        url = f"{self.base_url}/chat/completions"
        body = self._body(messages, max_tokens, temperature, stream=True)
        delivered = 0
        attempt = 0
        while True:
            self.last_usage, self.last_finish_reason = None, None
            try:
                with self._http().stream("POST", url, json=body) as response:
                    self._check_status(response, url)
                    for text in self._read_stream(response, url):
                        delivered += 1
                        yield text
                break
            except (httpx.TransportError, _Retryable) as exc:
                if delivered:
                    raise self._error(
                        f"Remote {url} failed mid-answer, after {delivered} chunks of text: "
                        f"{_describe(exc, self.timeout)}. Not retried, because the text so far was "
                        "already delivered; ask again."
                    ) from exc
                attempt += 1
                self._backoff_or_raise(url, attempt, exc)
            except httpx.HTTPError as exc:  # e.g. an undecodable body: not something a retry fixes
                raise self._error(f"Remote {url} failed: {_describe(exc, self.timeout)}.") from exc
        if self.last_usage is None:
            self.last_usage = Usage(None, delivered, estimated=True)

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
                return self._read_completion(response, url)
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

    def _backoff_or_raise(self, url: str, attempt: int, exc: Exception) -> None:
        """Sleep before retry number ``attempt``, or raise once the retries are spent."""
        if attempt > self.retries:
            raise self._error(
                f"Remote {url} failed after {attempt} attempt{'s' if attempt > 1 else ''}: "
                f"{_describe(exc, self.timeout)}. Check that the server is up and RPRA_REMOTE_URL "
                "is right, or raise RPRA_REMOTE_TIMEOUT / RPRA_REMOTE_RETRIES."
            ) from exc
        # Exponential backoff with a little jitter, so clients that failed together do not all
        # come back at the same instant; a server's Retry-After is a floor, not a suggestion.
        delay = self.backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, min(retry_after, _MAX_RETRY_AFTER))
        time.sleep(delay)

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

    def _read_stream(self, response: httpx.Response, url: str) -> Iterator[str]:
        """The text deltas of a server-sent-events answer; sets the ``last_*`` fields."""
        if response.headers.get("content-type", "").startswith("application/json"):
            # Some servers ignore ``stream: true`` and answer in one piece.
            yield _message_text(self._read_completion(response, url))
            return
        done = False
        for payload in self._sse_data(response, url):
            if payload.strip() == "[DONE]":
                done = True
                break
            chunk = self._json(payload, url)
            if chunk.get("usage"):
                self.last_usage = self._usage(chunk["usage"], url)
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
                self.last_finish_reason = choice.get("finish_reason") or self.last_finish_reason
            except AttributeError:
                raise self._not_openai(url, payload) from None
            if text and isinstance(text, str):
                yield text
        if not done and self.last_finish_reason is None:
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

    def _read_completion(self, response: httpx.Response, url: str) -> dict:
        """The JSON of a one-piece answer, checked to hold ``choices[0].message``; sets the ``last_*`` fields."""
        response.read()  # a no-op unless the body is still streaming
        data = self._json(response.text, url)
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
            self.last_finish_reason = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise self._not_openai(url, response.text) from None
        if not isinstance(content, str):
            raise self._not_openai(url, response.text)
        if data.get("usage"):
            self.last_usage = self._usage(data["usage"], url)
        else:
            self.last_usage = Usage(None, (len(content) + 3) // 4, estimated=True)
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
        return RemoteError(message)


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
