"""The HTTP side: a FastAPI app over an `Engine` (OpenAI chat completions, models, health, the chat page).

Every error leaves as OpenAI's body `{"error": {"message", "type", "param", "code"}}` with its
status; nothing a client sends produces a 500 with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import media
from .engine import Delta, Engine, Event, Failed, Finished, GenRequest, QueueFull, Sampling
from .limits import Limits
from .protocol import APIError, ChatRequest, bad, parse_chat_request, too_large

log = logging.getLogger("frozenvl.serve")
PAGE = Path(__file__).with_name("static") / "index.html"
DRAIN_AT_MOST = 256 * 1024 * 1024  # an oversized body is read and dropped up to this, so the client sees the 413
POLL_S = 0.25  # how often a waiting non-streamed request checks whether its client is still there


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _read_json(request: Request, limit: int) -> Any:
    """The JSON body, refused (413) past `limit` bytes before it is parsed or kept in memory."""
    declared = request.headers.get("content-length")
    over = declared is not None and declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            over = True
        if over:
            chunks = []
            if size > DRAIN_AT_MOST:
                break
            continue
        chunks.append(chunk)
    if over:
        raise too_large(f"request body of {int(declared) if declared and declared.isdigit() else size:,} bytes "
                        f"is over the limit of {limit:,} bytes")
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})") from None


def _chunk(rid: str, created: int, model: str, delta: dict | None, finish: str | None = None,
           usage: dict | None = None, include_usage: bool = False) -> str:
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [] if delta is None else
                            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if include_usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def _usage(done: Finished) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _failure(ev: Failed) -> APIError:
    if isinstance(ev.error, QueueFull):
        return APIError(503, str(ev.error), type="server_error", code="server_shutting_down")
    log.error("generation failed", exc_info=ev.error)
    return APIError(500, f"generation failed: {type(ev.error).__name__}: {ev.error}", type="server_error")


def create_app(model: Any, limits: Limits | None = None, *, api_key: str | None = None,
               engine: Engine | None = None) -> FastAPI:
    """The app; its engine starts and stops with it (pass one to share or inspect it)."""
    limits = limits or Limits()
    engine = engine or Engine(model, max_batch_size=limits.max_batch_size, max_queue=limits.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="frozenvl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.limits = engine, limits

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=e)
        return _error_response(APIError(500, f"internal error ({type(e).__name__})", type="server_error"))

    def _auth(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.status()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _auth(request)
        families = {name: wf.cfg.family for name, wf in model.workflows.items()}
        return {"object": "list", "data": [
            {"id": t, "object": "model", "created": 0, "owned_by": "frozenvl", "family": families.get(t, "base LLM"),
             "takes_images": t in families and model.workflow(t).uses_images}
            for t in model.tasks]}

    def _prepare(req: ChatRequest, on_event) -> GenRequest:
        """Images, chat template, tokens: in a worker thread of the pool, never on the event loop."""
        images = media.load_all(req.images, limits)
        try:
            prompt = model.render_chat(req.messages)
            sampling = Sampling(req.max_tokens, req.temperature, req.top_p, req.seed, req.stop)
            return engine.prepare(req.model, prompt, images, sampling, on_event, default_max_tokens=limits.max_tokens)
        except ValueError as e:  # ImageError included: what the request holds does not fit the model
            raise bad(str(e), "messages") from None

    async def _next(events: asyncio.Queue, deadline: float, request: Request | None) -> Event | None:
        """The next event; None once the deadline passed or (non-streamed) the client went away."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                return await asyncio.wait_for(events.get(), min(left, POLL_S) if request else left)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    return None

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        _auth(request)
        req = parse_chat_request(await _read_json(request, limits.max_body_bytes), limits)
        if req.model not in model.tasks:
            raise APIError(404, f"the model {req.model!r} does not exist; available: {', '.join(model.tasks)}",
                           param="model", code="model_not_found")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(ev: Event) -> None:  # from the engine's thread
            with contextlib.suppress(RuntimeError):  # the loop closed (server stopping): nobody to tell
                loop.call_soon_threadsafe(events.put_nowait, ev)

        gen = await run_in_threadpool(_prepare, req, on_event)
        try:
            engine.submit(gen)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        deadline = time.monotonic() + limits.request_timeout_s
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(_sse(gen, events, deadline, rid, created, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text: list[str] = []
        while True:
            ev = await _next(events, deadline, request)
            if ev is None:
                gen.cancel()
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it
                raise APIError(504, f"no answer within {limits.request_timeout_s:g} s; cancelled", type="timeout")
            if isinstance(ev, Delta):
                text.append(ev.text)
            elif isinstance(ev, Failed):
                raise _failure(ev)
            else:
                return JSONResponse({
                    "id": rid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "logprobs": None, "finish_reason": ev.reason}],
                    "usage": _usage(ev)})

    async def _sse(gen: GenRequest, events: asyncio.Queue, deadline: float, rid: str, created: int,
                   req: ChatRequest) -> AsyncIterator[str]:
        done = False
        usage = req.include_usage
        try:
            yield _chunk(rid, created, req.model, {"role": "assistant", "content": ""}, include_usage=usage)
            while True:
                ev = await _next(events, deadline, None)
                if ev is None:
                    err = APIError(504, f"no answer within {limits.request_timeout_s:g} s; cancelled", type="timeout")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                if isinstance(ev, Delta):
                    yield _chunk(rid, created, req.model, {"content": ev.text}, include_usage=usage)
                elif isinstance(ev, Failed):
                    done = True
                    yield f"data: {json.dumps(_failure(ev).body())}\n\n"
                    break
                else:
                    done = True
                    yield _chunk(rid, created, req.model, {}, ev.reason, include_usage=usage)
                    if usage:
                        yield _chunk(rid, created, req.model, None, usage=_usage(ev), include_usage=True)
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (the response task is cancelled)
            if not done:
                gen.cancel()

    return app


# ------------------------------------------------------------------ running it
def serve(model: Any, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          api_key: str | None = None, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(model, limits, api_key=api_key), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)


class ServerThread:
    """A real uvicorn server on a free port in a background thread (tests, the benchmark)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.sock, self.port = sock, sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
