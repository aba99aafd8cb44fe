"""The OpenAI HTTP backend of the load tester (``loadtest --backend openai``).

Same interface as :class:`~dsv32_loadtest.client.GenerationClient` (``probe``,
``generate``, ``close``), so the workloads, arrivals, metrics and report are
the gRPC backend's. Each request is a streamed ``POST /v1/completions`` with
the prompt's token ids, ``stream_options.include_usage`` and vLLM's
``return_token_ids`` (the tokens of each chunk are counted, as the gRPC
backend counts them). It speaks HTTP with ``aiohttp`` and reads the SSE lines
itself, as ``vllm bench serve`` does: a client SDK's own per-chunk cost
(the ``openai`` SDK adds ~20 ms to a first chunk here) would be charged to the
server. ``Authorization: Bearer <token>`` goes with every request when there is
an API token (``api_token``, else ``$DSV32_API_TOKEN``). HTTP errors are recorded
under the gRPC status names the report already knows (401 → ``UNAUTHENTICATED``,
429 → ``RESOURCE_EXHAUSTED``, 503 → ``UNAVAILABLE``, 504 → ``DEADLINE_EXCEEDED``...).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from ._api import serving_pb2 as pb
from .client import API_TOKEN_ENV, TargetError, bearer, check_target, resolve_api_token, settle_ended_stream
from .metrics import CLIENT_ERROR, RequestResult

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 503: "UNAVAILABLE",
           504: "DEADLINE_EXCEEDED"}


def base_url(target: str) -> str:
    """``HOST:PORT`` or ``http://HOST:PORT[/v1]`` → ``http://HOST:PORT/v1`` (any host)."""
    rest = target.split("://", 1)[1] if "://" in target else target
    hostport = rest.split("/", 1)[0]
    check_target(hostport)
    return f"http://{hostport}/v1"


class OpenAIClient:
    def __init__(self, target: str, connections: int = 4, api_token: str | None = None):
        import aiohttp

        self.aiohttp = aiohttp
        self.target, self.base = target, base_url(target)
        token = resolve_api_token(api_token)
        self.sent_token = bool(token)
        # ``connections`` bounds gRPC channels; HTTP/1.1 needs a connection per stream in flight
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
                                             headers={"Authorization": bearer(token)} if token else None)

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> "OpenAIClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def probe(self, timeout_s: float = 10.0, wait_s: float = 0.0) -> list[dict[str, Any]]:
        give_up = time.monotonic() + wait_s
        while True:
            try:
                async with self.session.get(f"{self.base}/models",
                                            timeout=self.aiohttp.ClientTimeout(total=timeout_s)) as r:
                    if r.status in (401, 403):
                        raise TargetError(f"the server at {self.target} refused the API token "
                                          f"({'sent' if self.sent_token else 'none sent'}: HTTP {r.status}): "
                                          f"set {API_TOKEN_ENV} or --api-token")
                    r.raise_for_status()
                    data = (await r.json())["data"]
                return [{"id": m["id"], "max_model_len": m.get("max_model_len", 0),
                         "vocab_size": m.get("vocab_size", 0), "numerics": ""} for m in data]
            except (self.aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as e:
                if time.monotonic() >= give_up:
                    raise TargetError(f"no OpenAI-compatible server answers at {self.target}: "
                                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
            await asyncio.sleep(0.5)

    def _body(self, request: pb.GenerateRequest) -> dict[str, Any]:
        s = request.sampling
        prompt = list(request.token_ids.ids) if request.WhichOneof("input") == "token_ids" else request.prompt
        body: dict[str, Any] = {"model": request.model, "prompt": prompt, "max_tokens": s.max_tokens,
                                "ignore_eos": s.ignore_eos, "stream": True, "return_token_ids": True,
                                "stream_options": {"include_usage": True}}
        if s.HasField("temperature"):
            body["temperature"] = s.temperature
        if request.session_id:
            body["session_id"] = request.session_id
        if request.request_id:
            body["request_id"] = request.request_id
        return body

    async def generate(self, request: pb.GenerateRequest, result: RequestResult, t0: float,
                       timeout_s: float) -> None:
        start = time.perf_counter()
        result.start_s = start - t0
        try:
            async with self.session.post(f"{self.base}/completions", json=self._body(request),
                                         timeout=self.aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if resp.status != 200:
                    text = await resp.text()
                    result.end_s = time.perf_counter() - start
                    result.status = _STATUS.get(resp.status, f"HTTP_{resp.status}")
                    result.error = text[:300]
                    return
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    now = time.perf_counter() - start
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise _StreamError(chunk["error"])
                    for c in chunk.get("choices") or []:
                        ids = c.get("token_ids") or []
                        if ids:
                            result.chunk_times_s.append(now)
                            result.chunk_tokens.append(len(ids))
                            result.reply_ids.extend(ids)
                        result.finish_reason = c.get("finish_reason") or result.finish_reason
                    if chunk.get("usage"):
                        result.server_prompt_tokens = chunk["usage"]["prompt_tokens"]
                        result.server_completion_tokens = chunk["usage"]["completion_tokens"]
                        details = chunk["usage"].get("prompt_tokens_details") or {}
                        if details.get("cached_tokens") is not None:
                            result.cached_tokens = int(details["cached_tokens"])
            settle_ended_stream(result, start)
        except _StreamError as e:
            result.end_s = time.perf_counter() - start
            err = e.args[0] if isinstance(e.args[0], dict) else {}
            result.status = str(err.get("code", "UNKNOWN")).upper()
            result.error = str(err.get("message", e))[:300]
        except asyncio.TimeoutError as e:
            result.end_s = time.perf_counter() - start
            result.status, result.error = "DEADLINE_EXCEEDED", f"timeout: {e}"
        except self.aiohttp.ClientError as e:
            result.end_s = time.perf_counter() - start
            result.status, result.error = "UNAVAILABLE", f"{type(e).__name__}: {e}"[:300]
        except asyncio.CancelledError:
            result.end_s = time.perf_counter() - start
            result.status, result.error = "CANCELLED", "cancelled by the load tester (interrupted)"
            raise
        except Exception as e:  # noqa: BLE001 - a harness bug is counted, not hidden
            result.end_s = time.perf_counter() - start
            result.status, result.error = CLIENT_ERROR, f"{type(e).__name__}: {e}"


class _StreamError(Exception):
    """An error object sent inside the event stream (after the 200 status)."""
