"""``vila-infer --serve``: an OpenAI-compatible HTTP API (``POST /v1/chat/completions``) over one loaded model.

``create_app(model, settings)`` builds the FastAPI app; ``serve(...)`` runs it with uvicorn (``pip install
'vila[serve]'``). Requests are checked and their media fetched on the event loop's side
(:mod:`vila.openai_protocol`); one worker thread owns the model and batches what it can
(:mod:`vila.scheduler`). Every error is OpenAI's error JSON with a 4xx/5xx status; tracebacks go to the
server log only, and each request logs one line (id, status, tokens, time) on stderr.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations (``Request``, imported
# inside create_app so that importing this module needs no FastAPI) at definition time.
import asyncio
import hmac
import json
import logging
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import MediaError, PromptTooLongError, UsageError
from .openai_protocol import (
    APIError,
    ChatRequest,
    Limits,
    chunk_body,
    completion_body,
    parse_chat_request,
    resolve_media,
    system_template,
    usage,
)
from .scheduler import Completion, Job, QueueFull, Scheduler, ShuttingDown

logger = logging.getLogger("vila.serve")


@dataclass
class ServeSettings:
    """How the server behaves (the ``vila-infer --serve`` flags)."""

    model_name: str  # the id /v1/models lists and requests name
    aliases: tuple[str, ...] = ()  # other accepted model names (e.g. the path the model was loaded from)
    api_key: str | None = None  # required as "Authorization: Bearer <key>" when set
    max_queue: int = 64  # waiting requests; more get 503 with Retry-After
    max_batch_size: int = 8  # greedy requests decoded together
    limits: Limits = field(default_factory=Limits)
    retry_after_s: int = 1


class _Disconnected(Exception):
    """The client went away; its job was cancelled."""


def create_app(model: Any, settings: ServeSettings) -> Any:
    """The FastAPI app serving ``model`` (starts its worker thread when the app starts)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    scheduler = Scheduler(model, max_queue=settings.max_queue, max_batch_size=settings.max_batch_size)
    names = (settings.model_name, *[a for a in settings.aliases if a and a != settings.model_name])
    limits = settings.limits
    created_at = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler

    def error_response(e: APIError) -> Any:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        message = {404: f"no such endpoint: {request.method} {request.url.path}", 405: "method not allowed"}
        return error_response(APIError(exc.status_code, message.get(exc.status_code, str(exc.detail))))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Any:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(APIError(500, "internal server error; see the server log", type="server_error"))

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key; send the server's key as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    def busy(reason: str) -> APIError:
        return APIError(
            503,
            f"the server is busy ({reason}); retry after {settings.retry_after_s} s",
            type="server_error",
            code="queue_full",
            headers={"Retry-After": str(settings.retry_after_s)},
        )

    async def read_json(request: Request) -> Any:
        too_large = APIError(
            413,
            f"the request body is larger than this server's limit of {limits.max_body_bytes} bytes; "
            "send smaller or fewer media",
            code="request_too_large",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limits.max_body_bytes:
                raise too_large
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from e

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "model": settings.model_name, "queued": scheduler.queued, "running": scheduler.running}

    @app.get("/v1/models")
    @app.get("/models")
    async def models(request: Request) -> Any:
        try:
            check_auth(request)
        except APIError as e:
            return error_response(e)
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "created": created_at, "owned_by": "vila"}],
        }

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        t0 = time.perf_counter()
        log = _RequestLog(rid, t0)
        job: Job | None = None
        try:
            check_auth(request)
            body = await read_json(request)
            req = parse_chat_request(body, model_names=names, limits=limits, context_length=model.context_length)
            template = system_template(model.template, model.tokenizer, req.system) if req.system else None
            default_frames = getattr(model.config, "num_video_frames", None) or 0
            if req.num_video_frames is None and default_frames > limits.max_video_frames:
                req.num_video_frames = limits.max_video_frames  # the checkpoint's default, capped
            if scheduler.queued >= settings.max_queue:  # fetch no media for a request that cannot wait
                raise busy(f"{scheduler.queued} requests are waiting")
            await asyncio.to_thread(resolve_media, req, limits)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            job = Job(
                id=rid,
                prompt=req.turns,
                settings=_generate_settings(req),
                on_event=lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)),
                template=template,
                stop=req.stop,
                stream=req.stream,
            )
            try:
                scheduler.submit(job)
            except QueueFull as e:
                raise busy(str(e)) from e
            kind, payload = await _next_event(request, job, events)
            if kind == "error":
                raise payload
            if req.stream:
                log.stream = True
                stream = _sse(request, job, events, req, rid, created, settings.model_name, log)
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
            while kind not in ("done", "error"):
                kind, payload = await _next_event(request, job, events)
            if kind == "error":
                raise payload
            done: Completion = payload
            log.tokens(done)
            log.write(200)
            return completion_body(
                rid,
                created,
                settings.model_name,
                done.text,
                done.finish_reason,
                done.num_prompt_tokens,
                done.num_completion_tokens,
            )
        except _Disconnected:
            log.write(499, "client disconnected")
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - every failure is answered as JSON
            if job is not None:
                job.cancel()
            err = to_api_error(e, rid)
            log.write(err.status, err.message)
            return error_response(err)

    return app


def _generate_settings(req: ChatRequest) -> dict[str, Any]:
    greedy = not req.temperature
    return {
        "max_new_tokens": req.max_tokens,
        "temperature": None if greedy else req.temperature,
        "top_p": None if greedy else req.top_p,
        "top_k": None if greedy else req.top_k,
        "seed": req.seed,
        "response_format": req.response_format,
        "num_video_frames": req.num_video_frames,
        "fps": req.fps,
    }


async def _next_event(request: Any, job: Job, events: asyncio.Queue) -> tuple[str, Any]:
    """The job's next event; cancels the job and raises :class:`_Disconnected` once the client is gone."""
    while True:
        if not events.empty():  # the common case while tokens stream: no timer task per token
            return events.get_nowait()
        try:
            return await asyncio.wait_for(events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise _Disconnected() from None


def _sse_line(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(
    request: Any,
    job: Job,
    events: asyncio.Queue,
    req: ChatRequest,
    rid: str,
    created: int,
    model_name: str,
    log: "_RequestLog",
) -> Any:
    """Server-sent ``chat.completion.chunk`` events, ending with ``data: [DONE]``."""
    status, note = 499, "client disconnected"
    try:

        def chunk(delta: Any, finish: str | None = None, used: Any = None) -> str:
            return _sse_line(chunk_body(rid, created, model_name, delta, finish, used, req.include_usage))

        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, payload = await _next_event(request, job, events)
            if kind == "delta":
                yield chunk({"content": payload})
            elif kind == "done":
                log.tokens(payload)
                yield chunk({}, payload.finish_reason)
                if req.include_usage:
                    yield chunk(None, None, usage(payload.num_prompt_tokens, payload.num_completion_tokens))
                yield "data: [DONE]\n\n"
                status, note = 200, ""
                return
            elif kind == "error":
                err = to_api_error(payload, rid)
                status, note = err.status, err.message
                yield _sse_line(err.body())
                yield "data: [DONE]\n\n"
                return
    except _Disconnected:
        pass
    finally:
        job.cancel()  # a no-op once done; stops the generation when the client left mid-stream
        log.write(status, note)


def to_api_error(e: BaseException, rid: str = "") -> APIError:
    """An exception from parsing or generation as the error the client sees (4xx: its fault, 5xx: ours)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), type="server_error", code="shutting_down")
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, (UsageError, MediaError)):
        return APIError(400, str(e), param="messages", code="invalid_media" if isinstance(e, MediaError) else None)
    logger.error("request %s failed", rid, exc_info=(type(e), e, e.__traceback__))
    return APIError(500, f"internal server error (request {rid}); see the server log", type="server_error")


class _RequestLog:
    """The one log line per request: id, status, tokens, seconds."""

    def __init__(self, rid: str, t0: float):
        self.rid, self.t0 = rid, t0
        self.prompt = self.completion = 0
        self.stream = False
        self.written = False

    def tokens(self, done: Completion) -> None:
        self.prompt, self.completion = done.num_prompt_tokens, done.num_completion_tokens

    def write(self, status: int, note: str = "") -> None:
        if self.written:
            return
        self.written = True
        logger.info(
            "%s %d prompt_tokens=%d completion_tokens=%d %.3fs%s%s",
            self.rid,
            status,
            self.prompt,
            self.completion,
            time.perf_counter() - self.t0,
            " stream" if self.stream else "",
            f" ({note})" if note else "",
        )


def setup_logging() -> None:
    """Request lines on stderr (``vila.serve`` at INFO), whatever the root logger's level."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(model: Any, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``model`` until interrupted (blocking)."""
    try:
        import uvicorn
    except ImportError as e:
        raise UsageError("--serve needs FastAPI and uvicorn: pip install 'vila[serve]'") from e
    setup_logging()
    app = create_app(model, settings)
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    logger.info("serving %s on http://%s:%d/v1 (Ctrl-C to stop)", settings.model_name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
