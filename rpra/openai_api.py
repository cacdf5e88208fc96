"""The OpenAI chat-completions wire format, as `rpra serve` speaks it.

Requests are validated with pydantic into what the runtime takes (messages, a mode, limits);
responses and stream chunks are built from the runtime's events and ``TurnResult``. Fields the
runtime cannot honour (tools, ``n`` > 1, images) are refused with a 400 that says so, rather than
silently ignored. The routing decision rides along in an extra ``rpra`` field, which OpenAI
clients ignore and rpra-aware ones read.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rpra.config import TEMPERATURE_RANGE
from rpra.errors import InputError

# A request picks its route by model name, by the `rpra_mode` body field, or by the X-RPRA-Mode
# header; chat UIs can only pick a model, scripts can do any of the three.
MODEL_MODES = {"rpra": "auto", "rpra-local": "local-only", "rpra-remote": "remote-only"}
REQUEST_MODES = {"auto": "auto", "local": "local-only", "remote": "remote-only"}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InputError(f"Content of type {part.type!r} is not supported: rpra's models read text only.")
            parts.append(part.text)
        return "\n".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of POST /v1/chat/completions that rpra reads; others are accepted and ignored
    (e.g. ``user``, ``seed``), except the ones it refuses (see ``check_supported``)."""

    model_config = ConfigDict(extra="allow")
    model: str = "rpra"
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])  # the settings' own range
    n: int | None = None
    rpra_mode: Literal["auto", "local", "remote"] | None = None

    @field_validator("messages")
    @classmethod
    def _last_is_user(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return messages

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise InputError("n > 1 is not supported: rpra answers each request once.")
        for name in ("tools", "functions", "tool_choice", "response_format"):
            value = (self.model_extra or {}).get(name)
            if value not in (None, [], {"type": "text"}, "none"):
                raise InputError(f"{name!r} is not supported by rpra serve; send plain chat messages.")

    def runtime_messages(self) -> list[dict]:
        """The conversation as the runtime takes it (``developer`` is the newer name of ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def mode(self, header: str | None) -> str:
        """The route this request asks for: header, then body field, then model name; else auto."""
        if header:
            if header.lower() not in REQUEST_MODES:
                raise InputError(f"X-RPRA-Mode must be one of {', '.join(REQUEST_MODES)}; got {header!r}.")
            return REQUEST_MODES[header.lower()]
        if self.rpra_mode:
            return REQUEST_MODES[self.rpra_mode]
        return MODEL_MODES.get(self.model, "auto")  # any other name (e.g. a client's default): auto


def parse_request(raw: bytes) -> ChatRequest:
    """Parse and validate a request body; InputError with a readable reason otherwise."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise InputError("The request body must be a JSON object with 'messages'.")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InputError(f"Invalid request: {where}: {first['msg']}.") from None
    request.check_supported()
    return request


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    """OpenAI's error shape, which clients turn into their own exceptions."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _finish_reason(reason: str) -> str:
    return "length" if reason in ("length", "context") else "stop"


def usage(result) -> dict:
    n = result.tokens
    if result.answered_by == "remote":
        prompt, completion = n.get("remote_prompt", 0), n.get("remote_completion", 0)
    else:
        prompt, completion = n.get("prompt", 0), n.get("local_answer", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def decision_fields(decision, prediction) -> dict:
    """The routing decision as the ``rpra`` field carries it."""
    return {
        "decision": decision.to_dict() if decision else None,
        "prediction": prediction.to_dict() if prediction else None,
    }


def result_fields(result) -> dict:
    """Everything about the finished turn a client may want (the ``rpra`` field)."""
    return {
        **decision_fields(result.decision, result.prediction),
        # The cascade (a verifier set): its prediction for the local draft, and whether that
        # draft was made and discarded unseen (deferred after the check).
        "draft_prediction": result.draft_prediction.to_dict() if result.draft_prediction else None,
        "draft_discarded": result.discarded_draft is not None,
        "rungs": result.rungs,  # the ladder's rungs taken (draft, best-of-N): each verdict and whether it was kept
        "pool": result.pool,  # routing over a pool: the target, each target's P(right) and expected cost, the budget left, the cost
        "answered_by": result.answered_by,
        "model": result.model if result.answered_by == "local" else None,
        "fallback": result.fallback,
        "remote_error": result.remote_error,
        # The remote's text shown before it broke off; the content holds it, then a marker, then
        # the local answer.
        "remote_partial": result.remote_partial,
        "dropped_messages": result.dropped_messages,  # oldest messages left out to fit the device's context
        "redactions": result.redactions,
        "turn_id": result.turn_id,
        "timings_ms": result.timings_ms,
        "verdict": result.verdict,
    }


def completion(result, *, model: str, rid: str) -> dict:
    """The whole answer (``stream: false``)."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer},
                "finish_reason": _finish_reason(result.finish_reason),
            }
        ],
        "usage": usage(result),
        "rpra": result_fields(result),
    }


def chunk(rid: str, model: str, *, delta: dict | None = None, finish: str | None = None, extra: dict | None = None, choices: bool = True) -> str:
    """One server-sent event of a streamed answer."""
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
    body.update(extra or {})
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def final_chunks(result, *, rid: str, model: str, include_usage: bool) -> str:
    """The end of a stream: finish reason and the turn's ``rpra`` record, usage if asked, [DONE]."""
    text = chunk(rid, model, finish=_finish_reason(result.finish_reason), extra={"rpra": result_fields(result)})
    if include_usage:
        text += chunk(rid, model, choices=False, extra={"usage": usage(result)})
    return text + "data: [DONE]\n\n"


def decision_headers(decision, prediction, turn_id: int | None) -> dict[str, str]:
    """The routing decision as response headers (ASCII only, as HTTP headers must be)."""
    headers = {"X-RPRA-Route": decision.route, "X-RPRA-Mode": decision.mode, "X-RPRA-Reason": _ascii(decision.reason),
               "X-RPRA-Decided-At": decision.point}  # "prompt", or "draft" when a verifier checked a draft
    if prediction is not None:
        headers["X-RPRA-Expected-Score"] = f"{prediction.expected:.3f}"
        headers["X-RPRA-P-Pass"] = f"{prediction.p_pass:.3f}"
        headers["X-RPRA-Distribution"] = ",".join(f"{p:.4f}" for p in prediction.probs)
    if turn_id is not None:
        headers["X-RPRA-Turn-Id"] = str(turn_id)
    return headers


def _ascii(text: str) -> str:
    return " ".join(text.encode("ascii", "backslashreplace").decode("ascii").split())[:300]
