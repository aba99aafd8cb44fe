"""The OpenAI-compatible HTTP front of the router (``router --http-port``).

It runs in the router process, on the router's event loop, and hands every
request to the router's one :class:`~dsv32_router.orchestrator.Orchestrator`:
the same validation, admission, pair choice, retries, sessions and request
records as the gRPC ``Generate``. Endpoints (the schema vLLM serves):

* ``GET /v1/models``; ``GET /health`` (200 while a serving pair exists, else 503,
  like the gRPC health service);
* ``POST /v1/completions`` and ``POST /v1/chat/completions``, whole or streamed
  as server-sent events (``data: {chunk}`` ... ``data: [DONE]``); with
  ``stream_options.include_usage`` a last chunk with empty ``choices`` carries
  the usage.

A refused request answers with the OpenAI error object and the status of its
gRPC code (400 naming the field, 404 unknown model, 400
``context_length_exceeded``, 429 back-pressure, 503 no workers, 504 deadline);
the status is known before the first byte because the first message is awaited
before the response starts. A client's deadline comes as ``X-Request-Timeout: SECONDS``
(the gRPC deadline's counterpart; none by default). A client that disconnects cancels its request: the
request's stream is closed, which cancels the worker calls and frees the pages,
exactly as a gRPC cancel does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from dsv32_cluster import metrics
from .http_openai import HttpRequest, chat_request, completion_request, error_body
from .http_output import ChoiceBuilder
from .orchestrator import Orchestrator
from .validation import RequestError


class HttpContext:
    """What the orchestrator reads of a gRPC context: the deadline (none over HTTP)."""

    def __init__(self, timeout_s: float | None = None):
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


def _error(e: RequestError) -> JSONResponse:
    metrics.process().requests(e.code.name).inc()  # the gRPC front's counter, same labels
    status, body = error_body(e.code, e.message)
    return JSONResponse(body, status_code=status)


async def _body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"body: not JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "body: must be a JSON object")
    return body


def build_app(orch: Orchestrator, tokenizer, request_timeout_s: float | None = None) -> FastAPI:
    app = FastAPI(title="dsv32-serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.get("/health")
    async def health():
        ok = orch.mode() is not None
        return JSONResponse({"status": "ok" if ok else "no serving pair"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        s = orch.spec
        return {"object": "list", "data": [{"id": s.name, "object": "model", "created": created,
                                            "owned_by": "dsv32-serve", "root": s.name,
                                            "max_model_len": s.max_model_len, "vocab_size": s.vocab_size}]}

    async def generate(request: Request, convert, chat: bool):
        try:
            hreq: HttpRequest = convert(await _body(request))
        except RequestError as e:
            return _error(e)
        builder = ChoiceBuilder(tokenizer, hreq, orch.spec.name, chat)
        try:  # a client's deadline, as gRPC clients send theirs: seconds, in a header
            timeout = float(request.headers.get("x-request-timeout") or 0) or request_timeout_s
        except ValueError:
            return _error(RequestError(grpc.StatusCode.INVALID_ARGUMENT, "x-request-timeout: not a number"))
        stream = orch.generate(hreq.grpc, HttpContext(timeout))
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = None
        except RequestError as e:
            await stream.aclose()
            return _error(e)
        except BaseException:
            await stream.aclose()
            raise
        if hreq.stream:
            return StreamingResponse(_sse(stream, first, builder), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(request, stream, first, builder)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat_request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, completion_request, False)

    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str):
        """dsv32 extension: end a session now (the gRPC ``EndSession``)."""
        try:
            found, freed = await orch.end_session(session_id)
        except RequestError as e:
            return _error(e)
        return {"id": session_id, "object": "session.deleted", "deleted": found, "released_pages": freed}

    return app


async def _whole(request: Request, stream, first, builder: ChoiceBuilder):
    """Collect the answer; a client that goes away meanwhile cancels it."""

    async def collect():
        async with contextlib.aclosing(stream):
            if first is not None:
                builder.add(first)
            async for out in stream:
                builder.add(out)

    task = asyncio.create_task(collect())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
        task.result()
    except asyncio.CancelledError:
        task.cancel()
        raise
    except RequestError as e:
        return _error(e)
    metrics.process().requests("OK").inc()
    return builder.whole()


async def _sse(stream, first, builder: ChoiceBuilder):
    # Starlette cancels this generator when the client disconnects; closing
    # ``stream`` then cancels the worker calls (see RequestRun.stream).
    async with contextlib.aclosing(stream):
        try:
            for chunk in builder.start():
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            if first is not None:
                for chunk in builder.chunks(first):
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            async for out in stream:
                for chunk in builder.chunks(out):
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            for chunk in builder.end():
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except RequestError as e:
            metrics.process().requests(e.code.name).inc()
            _, body = error_body(e.code, e.message)
            yield f"data: {json.dumps(body)}\n\n"
        else:
            metrics.process().requests("OK").inc()
        yield "data: [DONE]\n\n"


class _Server(uvicorn.Server):
    """uvicorn inside the router's loop: the router owns SIGINT/SIGTERM, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def start_http(app: FastAPI, host: str, port: int) -> tuple[asyncio.Task, _Server, str]:
    """Bind ``host:port`` (0 = any free port) and serve ``app``; returns (task, server, "HOST:PORT")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"router: cannot bind HTTP {host}:{port}: {e}") from None
    sock.listen(1024)
    sock.setblocking(False)
    # keep-alive longer than clients' own idle timeouts (aiohttp 15 s): a client must never reuse a
    # connection that the server is closing at that moment
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                    timeout_graceful_shutdown=2, timeout_keep_alive=75))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
    return task, server, f"{host}:{sock.getsockname()[1]}"

