"""The HTTP side: OpenAI's routes on FastAPI, each request a job for the worker thread.

Handlers never touch MLX. They read the body (refusing an oversized one
before it is read whole), check it, queue a job and relay its events: as
one JSON body, or as server-sent events ending in ``data: [DONE]``. A
client that disconnects, while waiting or mid-stream, cancels its job.
"""

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .access import Access, add_access_checks
from .connections import ConnectionGuard
from .protocol import APIError, Ask, Limits, parse_chat, parse_completion, parse_json
from .responses import DONE, Shape, error_response, event, model_body, models_body
from .worker import ClientGone, Failed, Finished, Job, Piece, Worker

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(worker: Worker, max_body: int, access: Access = Access(), guard: Optional[ConnectionGuard] = None) -> FastAPI:
    """The server's routes over a started ``worker``, behind ``access``'s checks.

    ``max_body``: the most bytes a request body may have; ``guard``: the
    connections' bounds, whose counts /health shows.
    """
    limits: Limits = worker.settings.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()
        if guard is not None:
            guard.flush()  # the counts not yet logged (uvicorn re-raises SIGTERM after this: no later chance)

    app = FastAPI(title="ifp-mlx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_access_checks(app, access)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return error_response(APIError(500, f"{type(e).__name__}: {e}", type="server_error"))

    @app.get("/health")
    async def health() -> dict:
        counters = worker.counters
        health = {
            "status": "ok", "model": limits.model_id, "waiting": worker.waiting,
            "served": counters.served, "cancelled": counters.cancelled, "failed": counters.failed,
        }
        if guard is not None:
            health["connections"] = guard.counts()
        return health

    @app.get("/v1/models")
    async def models() -> dict:
        return models_body(limits.model_id, int(worker.counters.started))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id not in limits.model_names:
            raise APIError(404, f"the model {model_id!r} is not served here", "model", code="model_not_found")
        return model_body(limits.model_id, int(worker.counters.started))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, "chat", parse_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "text", parse_completion)

    async def answer(request: Request, kind: str, parse: Callable[[dict, Limits], Ask]):
        check_json(request)
        try:
            ask = parse(parse_json(await read_body(request, max_body)), limits)
        except ClientDisconnect:
            return gone()
        job = worker.submit(ask, asyncio.get_running_loop())
        shape = Shape(kind, limits.model_id)
        try:
            first = await job.next_event(request)
        except ClientGone:
            return gone()
        except asyncio.CancelledError:
            job.cancel()
            raise
        if isinstance(first, Failed):
            return error_response(first.error)
        if ask.stream:
            return StreamingResponse(stream(job, first, request, shape), media_type="text/event-stream", headers=SSE_HEADERS)
        return await whole(job, first, request, shape)

    return app


def gone() -> Response:
    """The answer to a client that already disconnected (nobody reads it; the access log shows 499)."""
    return Response(status_code=499)


def check_json(request: Request) -> None:
    """415 unless the body is declared JSON: a cross-site form may post text/plain without asking first."""
    given = request.headers.get("content-type", "")
    media, *params = [part.strip().lower() for part in given.split(";")]
    charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
    if media != "application/json" or any(c not in ("utf-8", "utf8") for c in charsets):
        shown = repr(given[:100]) if given else "none"
        raise APIError(415, f"the request body must be JSON: send Content-Type: application/json (got {shown})")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    ``Content-Length`` decides before anything is read; a chunked body is
    counted as it arrives, so neither kind is ever held whole past the limit.
    """
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, f"Content-Length {length!r} is not a number")
        if int(length) > limit:
            raise APIError(413, f"the request body is {int(length)} bytes, more than this server's limit of {limit}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"the request body is more than this server's limit of {limit} bytes")
    return bytes(data)


async def whole(job: Job, first, request: Request, shape: Shape):
    """The reply as one body, once generation has finished."""
    parts, current = [], first
    try:
        while isinstance(current, Piece):
            parts.append(current.text)
            current = await job.next_event(request)
    except ClientGone:
        return gone()
    except asyncio.CancelledError:
        job.cancel()
        raise
    if isinstance(current, Failed):
        return error_response(current.error)
    return shape.whole("".join(parts), current.finish_reason, current.usage, current.info)


async def stream(job: Job, first, request: Request, shape: Shape) -> AsyncIterator[str]:
    """The reply as server-sent events; a client that goes away cancels the job (``finally``)."""
    current = first
    try:
        while True:
            if isinstance(current, Piece):
                yield event(shape.chunk(current.text))
            elif isinstance(current, Finished):
                yield event(shape.chunk("", current.finish_reason))
                if job.ask.include_usage:
                    yield event(shape.usage_chunk(current.usage, current.info))
                break
            else:  # Failed after the reply began: the status line is gone, so the error goes in the stream
                yield event(current.error.body())
                break
            current = await job.next_event(request)
        yield DONE
    except ClientGone:
        return
    finally:
        job.cancel()  # no-op for a finished job; stops one whose client went away
