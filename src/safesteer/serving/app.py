"""The FastAPI application: ``/v1/models``, ``/v1/chat/completions`` (plain and SSE), ``/health``.

Requests are validated here (readable 4xx errors, OpenAI's error shape) and handed to the
:class:`~safesteer.serving.engine.Engine` as jobs; the model never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from safesteer.serving.engine import Engine, Event, Job
from safesteer.serving.loading import artifact_hint
from safesteer.serving.prompts import PromptError, check_fits, encode_messages
from safesteer.serving.protocol import ChatRequest, Method, describe_errors, error_body

MAX_BODY_BYTES = 4 * 1024 * 1024
CHARS_PER_TOKEN_BOUND = 32  # no tokenizer packs more characters into one token than this


@dataclass(frozen=True)
class ServeSettings:
    """What the HTTP layer needs besides the engine."""

    model_id: str
    default_method: Method = "none"
    api_key: str | None = None
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    context: int | None = None  # the model's context window in tokens

    def __post_init__(self) -> None:
        if self.max_tokens_limit < 1:
            raise ValueError("the max_tokens limit must be at least 1")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError("the default max_tokens must lie in 1..the max_tokens limit")


class ApiError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def _now() -> int:
    return int(time.time())


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The app; its lifespan starts the engine and stops it after the last request finished."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    def authorise(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send Authorization: Bearer KEY", "auth_error")
        if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "wrong API key", "auth_error")

    app = FastAPI(title="safesteer", lifespan=lifespan, dependencies=[Depends(authorise)])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(str(exc), exc.kind), exc.status, headers=headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_id,
            "methods": engine.methods(),
            "default_method": settings.default_method,
            "queued": engine.queued(),
            "active": len(engine.active()),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "safesteer"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        body = await _read_json(request)
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            raise ApiError(400, describe_errors(exc)) from None
        job = _job(engine, settings, req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job.listener = _threadsafe(loop, events)
        engine.submit(job)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": _now(), "model": settings.model_id}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(engine, job, events, meta, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(engine, job, events, meta, request)

    return app


async def _read_json(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is over {MAX_BODY_BYTES // 1024 // 1024} MiB")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is over {MAX_BODY_BYTES // 1024 // 1024} MiB")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None


def _job(engine: Engine, settings: ServeSettings, req: ChatRequest) -> Job:
    if req.model != settings.model_id:
        raise ApiError(
            404,
            f"model {req.model!r} is not served here; this server serves {settings.model_id!r}",
            "not_found_error",
        )
    options = req.safesteer
    method: Method = (options.method if options else None) or settings.default_method
    if method not in engine.methods():
        raise ApiError(
            400,
            f"method {method!r} is not loaded on this server (it runs: "
            f"{', '.join(engine.methods())}); it needs {artifact_hint(method)}",
        )
    alpha = options.alpha if options else None
    if alpha is not None and method != "scans":
        raise ApiError(400, f"alpha is SCANS' steering strength; method {method!r} takes none")
    max_tokens = req.requested_tokens() or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens {max_tokens:,} is over this server's limit of "
            f"{settings.max_tokens_limit:,} (--max-tokens-limit)",
        )
    chars = sum(len(m.text) for m in req.messages)
    if settings.context is not None and chars > settings.context * CHARS_PER_TOKEN_BOUND:
        raise ApiError(
            400,
            f"the messages are {chars:,} characters, far over the model's context of "
            f"{settings.context:,} tokens; shorten them",
        )
    try:
        ids = encode_messages(engine.lm, req.messages, engine.system_prompt(method))
        check_fits(len(ids), max_tokens, engine.extra_tokens(method), settings.context)
    except PromptError as exc:
        raise ApiError(400, str(exc)) from None
    return Job(prompt_ids=ids, method=method, max_tokens=max_tokens, alpha=alpha)


def _threadsafe(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event]) -> Callable:
    def put(event: Event) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    return put


def _usage(job: Job) -> dict[str, int]:
    prompt, completion = len(job.prompt_ids), len(job.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def final_text(engine: Engine, ids: list[int]) -> str:
    """The reply as the library returns it (special tokens dropped, stripped)."""
    return str(engine.lm.tokenizer.decode(ids, skip_special_tokens=True)).strip()


async def _complete(
    engine: Engine, job: Job, events: asyncio.Queue[Event], meta: dict[str, Any], request: Request
) -> JSONResponse:
    while True:
        try:
            kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return JSONResponse(error_body("client went away"), 499)
            continue
        if kind == "error":
            return JSONResponse(error_body(str(value), "server_error"), 500)
        if kind == "done":
            break
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": final_text(engine, job.token_ids)},
        "finish_reason": job.finish_reason,
        "logprobs": None,
    }
    body = {
        **meta,
        "object": "chat.completion",
        "choices": [choice],
        "usage": _usage(job),
        "safesteer": job.decision,
    }
    return JSONResponse(body)


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"


class _Detokenizer:
    """Text deltas of a growing token list whose concatenation is the final (stripped) reply.

    Leading and trailing whitespace and an incomplete UTF-8 sequence are held back until text
    follows, so that the deltas join to exactly :func:`final_text`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = str(self.engine.lm.tokenizer.decode(self.ids, skip_special_tokens=True)).strip()
        text = text.rstrip("\ufffd").rstrip()
        return self._delta(text)

    def finish(self) -> str:
        return self._delta(final_text(self.engine, self.ids))

    def _delta(self, text: str) -> str:
        if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


async def _stream(
    engine: Engine,
    job: Job,
    events: asyncio.Queue[Event],
    meta: dict[str, Any],
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return _sse({**meta, "object": "chat.completion.chunk", "choices": [choice], **extra})

    text = _Detokenizer(engine)
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind == "token":
                delta = text.push(int(value))
                if delta:
                    yield chunk({"content": delta})
            elif kind == "error":
                yield _sse({"error": error_body(str(value), "server_error")["error"]})
                break
            else:
                rest = text.finish()
                if rest:
                    yield chunk({"content": rest})
                yield chunk({}, job.finish_reason, safesteer=job.decision)
                if include_usage:
                    usage = {**meta, "object": "chat.completion.chunk", "choices": []}
                    yield _sse({**usage, "usage": _usage(job)})
                break
        yield _sse("[DONE]")
    finally:
        if job.finish_reason is None:
            job.cancel()  # the client went away: free the row at the next step
