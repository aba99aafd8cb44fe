"""The asyncio gRPC client: a fixed pool of connections, one streaming call per request.

Each request's stream is timed on the client's clock (``time.perf_counter``)
into a ``RequestResult``; every outcome — success, a gRPC status, a stream
that ended without tokens, a harness bug, a cancellation — ends up in that
record's ``status``, so nothing is dropped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from typing import Any

import grpc

from ._api import serving_pb2 as pb
from ._api import serving_pb2_grpc as pb_grpc
from .metrics import CLIENT_ERROR, EMPTY_STREAM, FINISH_ABORT, OK, RequestResult, output_digest

_MAX_MESSAGE = 64 << 20


API_TOKEN_ENV = "DSV32_API_TOKEN"


def resolve_api_token(token: str | None = None) -> str:
    """The public API token to send: ``token``, else ``$DSV32_API_TOKEN``, else the contents of the file
    ``$DSV32_API_TOKEN_FILE``, else "" (none): what the router reads (``dsv32_cluster.auth``)."""
    return token if token is not None else env_secret(API_TOKEN_ENV)


def env_secret(var: str) -> str:
    """``$VAR``, else the contents of the file ``$VAR_FILE`` (a mounted secret), else ""."""
    value = os.environ.get(var, "")
    path = os.environ.get(var + "_FILE", "")
    if not value and path:
        with open(path) as f:
            value = f.read().strip()
    return value


def bearer(token: str) -> str:
    return f"Bearer {token}"



def settle_ended_stream(result: RequestResult, start: float) -> None:
    """A stream that ended without a transport error: OK, the server's abort, or an empty answer
    (the same rule for every backend)."""
    result.end_s = time.perf_counter() - start
    if result.finish_reason == "abort":
        result.status, result.error = FINISH_ABORT, "the server finished the stream with 'abort'"
    elif not result.chunk_tokens:
        result.status, result.error = EMPTY_STREAM, "the call ended OK without streaming a token"
    else:
        result.status = OK
        result.output_hash = output_digest(result.reply_ids)


class TargetError(RuntimeError):
    """The target cannot be load-tested; the message is one line for the user."""


def split_target(target: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``HOST:PORT`` target (also ``[v6]:PORT``, ``dns:///``, ``ipv4:``); None for
    ``unix:``. A target without a port is a ``TargetError``."""
    if target.startswith(("unix:", "unix-abstract:")):
        return None
    rest = target
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if rest.startswith(scheme):
            rest = rest[len(scheme):]
            break
    if rest.startswith("[") and "]:" in rest:
        host, port = rest[1:rest.index("]")], rest[rest.index("]:") + 2:]
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(f"target {target!r}: expected HOST:PORT ([IPv6]:PORT, dns:///HOST:PORT or unix:PATH)")
    return host, int(port)


def check_target(target: str) -> None:
    """Any reachable host: a deployment (Helm, Ray) as well as this machine (the default target)."""
    split_target(target)


def is_loopback(target: str) -> bool:
    hp = split_target(target)
    if hp is None or hp[0] == "localhost":
        return True
    try:
        return ipaddress.ip_address(hp[0]).is_loopback
    except ValueError:
        return False


class GenerationClient:
    """``connections`` channels (one HTTP/2 connection each), used round-robin. Every call carries
    ``authorization: Bearer <api_token>`` when there is a token (see :func:`resolve_api_token`)."""

    def __init__(self, target: str, connections: int = 4, api_token: str | None = None):
        check_target(target)
        token = resolve_api_token(api_token)
        self._metadata = (("authorization", bearer(token)),) if token else None
        if connections < 1:
            raise ValueError(f"connections must be >= 1, got {connections}")
        self.target = target
        # A local subchannel pool per channel: otherwise equal channels share one connection.
        options = [("grpc.use_local_subchannel_pool", 1),
                   ("grpc.max_receive_message_length", _MAX_MESSAGE),
                   ("grpc.max_send_message_length", _MAX_MESSAGE)]
        self._channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
        self._stubs = [pb_grpc.GenerationStub(ch) for ch in self._channels]
        self._next = 0

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels))

    async def __aenter__(self) -> "GenerationClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _stub(self) -> pb_grpc.GenerationStub:
        self._next = (self._next + 1) % len(self._stubs)
        return self._stubs[self._next]

    async def probe(self, timeout_s: float = 10.0, wait_s: float = 0.0) -> list[dict[str, Any]]:
        """The served models (``ListModels``); ``TargetError`` if nothing answers.

        Retries for ``wait_s`` seconds, for a cluster that is still starting.
        A server that does not implement ``ListModels`` gives an empty list.
        """
        give_up = time.monotonic() + wait_s
        while True:
            try:
                reply = await self._stubs[0].ListModels(pb.ListModelsRequest(), timeout=timeout_s,
                                                         metadata=self._metadata)
                return [{"id": m.id, "max_model_len": m.max_model_len, "vocab_size": m.vocab_size,
                         "numerics": m.numerics} for m in reply.models]
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return []
                retryable = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise TargetError(f"the server at {self.target} refused the API token "
                                      f"({'none sent' if self._metadata is None else 'sent'}): set "
                                      f"{API_TOKEN_ENV} or --api-token") from None
                if not retryable or time.monotonic() >= give_up:
                    detail = (e.details() or "").splitlines()[0] if e.details() else ""
                    raise TargetError(f"no dsv32 Generation server answers at {self.target}: "
                                      f"{e.code().name}{': ' + detail if detail else ''}") from None
            await asyncio.sleep(0.5)

    async def generate(self, request: pb.GenerateRequest, result: RequestResult, t0: float,
                       timeout_s: float) -> None:
        """Send one request and fill ``result``; ``t0`` is the run's start on perf_counter."""
        start = time.perf_counter()
        result.start_s = start - t0
        call = self._stub().Generate(request, timeout=timeout_s, metadata=self._metadata)
        try:
            async for msg in call:
                now = time.perf_counter() - start
                if msg.token_ids:
                    result.chunk_times_s.append(now)
                    result.chunk_tokens.append(len(msg.token_ids))
                    result.reply_ids.extend(msg.token_ids)
                result.prefill_worker = result.prefill_worker or msg.prefill_worker
                result.decode_worker = result.decode_worker or msg.decode_worker
                result.finish_reason = msg.finish_reason or result.finish_reason
                if msg.HasField("usage"):
                    u = msg.usage
                    result.server_prompt_tokens = u.prompt_tokens
                    result.server_completion_tokens = u.completion_tokens
                    result.server_ttft_s = u.time_to_first_token_s
                    result.server_e2e_s = u.e2e_s
                    result.cached_tokens = u.cached_tokens
            settle_ended_stream(result, start)
        except grpc.aio.AioRpcError as e:
            result.end_s = time.perf_counter() - start
            result.status, result.error = e.code().name, e.details() or ""
        except asyncio.CancelledError:
            result.end_s = time.perf_counter() - start
            result.status, result.error = "CANCELLED", "cancelled by the load tester (interrupted)"
            call.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - a harness bug is counted, not hidden
            result.end_s = time.perf_counter() - start
            result.status, result.error = CLIENT_ERROR, f"{type(e).__name__}: {e}"
            call.cancel()
