"""The FastAPI application: routes, the API key check, and errors as OpenAI error objects.

Every request that cannot be served gets a 4xx (or, for a bug, a 500) with a body
`{"error": {"message", "type", "param", "code"}}` and never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, Counter
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..chat import Settings, available_methods, refuse_draft_only
from ..engine import Engine, Prompt, Result
from ..errors import GgspecError
from .metrics import Metrics
from .replies import Reply, error_body, sse
from .schema import CONFLICT, ChatRequest, CompletionRequest, GenerationRequest
from .worker import InternalError, Job, QueueFull, ShuttingDown, Worker

MAX_BODY = 4 << 20  # bytes of a request body
STATIC = ("ggspec.server", "static")  # the chat page: index.html, chat.js, chat.css
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
CLIENT_CLOSED = 499  # nginx's code for a request whose client left before the answer


def create_app(engine: Engine, defaults: Settings, *, api_key: str | None = None, max_queue: int = 16,
               max_body: int = MAX_BODY) -> FastAPI:
    """The server for `engine`. `defaults` fill what a request leaves out; with `api_key`,
    every /v1 route needs `Authorization: Bearer <api_key>`."""
    worker = Worker(engine, max_queue, defaults.spec)
    metrics = Metrics(worker)
    model = engine.target.path.stem

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="ggspec", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker = worker  # (ggspec.server.serve stops it as soon as shutting down begins)
    app.add_middleware(_Guard, api_key=api_key, max_body=max_body, requests=metrics.requests)
    app.mount("/static", StaticFiles(packages=[STATIC]), name="static")
    _add_error_handlers(app, max_body)

    page_html = resources.files(STATIC[0]).joinpath(STATIC[1], "index.html").read_text(encoding="utf-8")

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "busy": worker.busy, "queued": worker.queued}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        spec = defaults.spec
        return {"object": "list", "data": [{
            "id": model, "object": "model", "created": int(engine.target.path.stat().st_mtime),
            "owned_by": "ggspec",
            "ggspec": {"target": str(engine.target.path), "draft": str(engine.draft.path) if engine.draft else None,
                       "methods": available_methods(engine), "method": spec.method, "draft_max": spec.draft_max,
                       "draft_p_min": spec.draft_p_min,
                       "temperature": defaults.sampling.temperature,
                       "n_ctx": engine.n_ctx, "max_tokens": defaults.max_tokens},
        }]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        if not engine.target.chat_template:
            raise GgspecError(f"{engine.target.path.name} has no chat template; use /v1/completions")
        messages = [m.model_dump() for m in body.messages]
        return await generate(request, body, messages, Reply(chat=True, model=model))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(request, body, body.prompt, Reply(chat=False, model=model))

    def settings(body: GenerationRequest) -> Settings:
        """The server's defaults with what the request sets."""
        sampling = replace(defaults.sampling, **{
            k: v for k in ("temperature", "top_k", "top_p", "min_p", "seed", "ignore_eos")
            if (v := getattr(body, k)) is not None})
        spec = replace(defaults.spec, **{k: v for k in ("method", "draft_max", "draft_p_min")
                                         if (v := getattr(body, k)) is not None})
        if spec.method not in available_methods(engine):
            raise GgspecError(f"method {spec.method!r} is not available on this server; "
                              f"available: {', '.join(available_methods(engine))}")
        refuse_draft_only(spec.method, ["draft_p_min"] if body.draft_p_min is not None else [],
                          "send it with method draft")
        return Settings(sampling, spec, body.length or defaults.max_tokens)

    async def generate(request: Request, body: GenerationRequest, prompt: Prompt, reply: Reply) -> Response:
        job = Job(prompt, settings(body), body.stops, asyncio.get_running_loop(), body.cache_prompt)
        worker.submit(job)
        events = _events(job, request, worker)
        first = await anext(events, None)  # a request that fails does so before any text
        if first is None:
            return Response(status_code=CLIENT_CLOSED)
        if body.stream:
            return StreamingResponse(_stream(reply, job, first, events, body.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = first
        async for result in events:
            pass
        if not isinstance(result, Result):
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(reply.whole(job, result))

    return app


async def _events(job: Job, request: Request, worker: Worker) -> AsyncIterator[str | Result]:
    """The job's pieces, then its Result; an error from the engine is raised. Ends early
    when the client disconnects, and then (like any early close) withdraws the job."""
    disconnected = asyncio.ensure_future(_disconnect(request))
    try:
        while True:
            event = asyncio.ensure_future(job.events.get())
            await asyncio.wait((event, disconnected), return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                return
            if isinstance(event.result(), Exception):
                raise event.result()
            yield event.result()
            if isinstance(event.result(), Result):
                return
    finally:
        worker.withdraw(job)
        disconnected.cancel()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(reply: Reply, job: Job, first: str | Result, events: AsyncIterator[str | Result],
                  include_usage: bool) -> AsyncIterator[str]:
    """The Server-Sent Events of one answer, ending with `data: [DONE]`."""
    opening = reply.opening()
    if opening is not None:
        yield sse(opening)
    event = first
    try:
        while not isinstance(event, Result):
            yield sse(reply.piece(event))
            event = await anext(events, None)
            if event is None:  # the client left
                return
    except (GgspecError, ValueError, InternalError, ShuttingDown) as e:  # after the headers: the last event
        status = 500 if isinstance(e, InternalError) else 503 if isinstance(e, ShuttingDown) else 400
        yield sse(error_body(str(e), status))
        return
    yield sse(reply.closing(job, event))
    if include_usage:
        yield sse(reply.usage(event))
    yield sse("[DONE]")


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status, headers=headers)


def _too_large(max_body: int) -> str:
    return f"the request body is larger than the server's limit of {max_body} bytes"


def _add_error_handlers(app: FastAPI, max_body: int) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        loc = [str(x) for x in first["loc"] if x != "body"]
        param = ".".join(loc) or None
        if first["type"] == "extra_forbidden":
            return _error(400, f"unknown parameter {param!r}", param)
        if not loc:  # the body as a whole: a check across its fields, or not an object
            return _error(400, first["msg"] if first["type"] == CONFLICT else "the body must be a JSON object")
        return _error(400, f"{param}: {first['msg']}" if param else first["msg"], param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        messages = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}",
                    413: _too_large(max_body)}
        return _error(e.status_code, messages.get(e.status_code, str(e.detail)), headers=e.headers)

    @app.exception_handler(QueueFull)
    async def busy(request: Request, e: QueueFull) -> JSONResponse:
        return _error(429, f"{e}; retry later", headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(ShuttingDown)
    async def stopping(request: Request, e: ShuttingDown) -> JSONResponse:
        return _error(503, str(e))

    @app.exception_handler(GgspecError)
    @app.exception_handler(ValueError)
    async def refused(request: Request, e: Exception) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        return _error(500, "internal error; the server log has the details")


class _Guard:
    """Runs before any route: counts responses by route and status, limits the body size,
    and on /v1 checks the API key (in constant time, before the body is read) and that a
    POST body is JSON (a browser on another site cannot send that without permission)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body: int, requests: Counter):
        self.app = app
        self.key = None if api_key is None else api_key.encode()
        self.max_body = max_body
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "/static" if path.startswith("/static/") else "other"

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.requests.labels(route, str(message["status"])).inc()
            await send(message)

        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPException(413)
            return message

        refusal = self._refusal(scope, path)
        if refusal is None:
            await self.app(scope, limited, counted)
        else:
            await refusal(scope, receive, counted)

    def _refusal(self, scope: Scope, path: str) -> JSONResponse | None:
        headers = Headers(scope=scope)
        if int(headers.get("content-length") or 0) > self.max_body:
            return _error(413, _too_large(self.max_body))
        if not (path == "/v1" or path.startswith("/v1/")):
            return None
        if self.key is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if not scheme:
                return _error(401, "missing API key: send the header Authorization: Bearer KEY",
                              headers={"WWW-Authenticate": "Bearer"})
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key):
                return _error(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        kind = headers.get("content-type", "").partition(";")[0].strip().lower()
        if scope["method"] == "POST" and not (kind == "application/json" or kind.endswith("+json")):
            return _error(415, f"send the body as JSON with the header Content-Type: application/json "
                               f"(got {kind or 'no Content-Type'})")
        return None
