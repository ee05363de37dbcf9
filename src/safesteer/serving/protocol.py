"""Request and response bodies of the OpenAI-compatible API (pydantic), and readable errors.

Only what the server does is accepted: greedy decoding, one choice, text messages. Anything else
(``frequency_penalty``, ``tools``, ``n=2``, a temperature above 0 ...) is refused with a message
rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Method = Literal["none", "scans", "safeswitch", "scans+safeswitch"]
METHODS: tuple[Method, ...] = ("none", "scans", "safeswitch", "scans+safeswitch")


class SafesteerOptions(BaseModel):
    """The request's ``safesteer`` field (clients send it through ``extra_body``)."""

    model_config = ConfigDict(extra="forbid")

    method: Method | None = None
    alpha: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class TextPart(BaseModel):
    """One ``{"type": "text", "text": ...}`` part of a message's content."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message with text content."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is known."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``: the supported subset of OpenAI's parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, allow_inf_nan=False)
    n: int | None = None
    seed: int | None = None  # accepted: decoding is greedy, so a seed changes nothing
    user: str | None = None
    safesteer: SafesteerOptions | None = None

    @field_validator("temperature")
    @classmethod
    def _greedy(cls, value: float | None) -> float | None:
        if value is not None and value != 0:
            raise ValueError("this server decodes greedily: omit temperature or set it to 0")
        return value

    @field_validator("top_p")
    @classmethod
    def _no_nucleus(cls, value: float | None) -> float | None:
        if value is not None and value != 1:
            raise ValueError("this server decodes greedily: omit top_p or set it to 1")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("this server returns one choice: omit n or set it to 1")
        return value

    @field_validator("messages")
    @classmethod
    def _has_text(cls, messages: list[Message]) -> list[Message]:
        if not any(m.text.strip() for m in messages):
            raise ValueError("every message is empty; send at least one non-empty message")
        if messages[-1].role == "assistant":
            raise ValueError(
                "the last message is the assistant's; end with a user message (continuing an "
                "assistant reply is not supported)"
            )
        return messages

    def requested_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


SUPPORTED = ", ".join(ChatRequest.model_fields)


def describe_errors(errors: list[dict[str, Any]] | ValidationError) -> str:
    """One readable line from pydantic / FastAPI validation errors."""
    items = errors.errors() if isinstance(errors, ValidationError) else errors
    parts: list[str] = []
    for error in items:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        kind = error.get("type", "")
        if kind == "json_invalid":
            ctx = error.get("ctx") or {}
            parts.append(f"the body is not valid JSON ({ctx.get('error', 'parse error')})")
        elif kind == "extra_forbidden":
            parts.append(
                f"unsupported parameter {where!r} (this server accepts {SUPPORTED}; the "
                "safesteer field takes method and alpha)"
            )
        elif kind == "missing":
            parts.append(f"{where} is required")
        else:
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{where}: {message}")
    return "; ".join(parts) or "invalid request"


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
