"""Shared secrets of a cluster: the public API token, the internal-plane token, worker signatures.

* **Public API** (router): ``DSV32_API_TOKEN`` (or a file named by ``DSV32_API_TOKEN_FILE``) set →
  every call but the health check needs gRPC metadata ``authorization: Bearer <token>``, else
  ``UNAUTHENTICATED``. Clients (``dsv32_router.client``, ``generate --target``) send the same variable.
* **Internal plane** (router ↔ workers): ``DSV32_INTERNAL_TOKEN`` (or ``DSV32_INTERNAL_TOKEN_FILE``) set →
  workers answer only calls carrying ``x-dsv32-internal: <token>`` (the router's channels add it), and
  every worker signs its registration with it (HMAC over its id, role and endpoints); routers ignore a
  registered worker whose signature does not verify, so a fake worker written into Redis without the
  secret receives no prompt, and the router never sends the token to it.
* **KV transfer**: per transfer, see ``dsv32_engine.transfer.pair.Announcement.proof``.

Secrets travel in the environment or files (never on a command line, which ``ps`` shows).
"""

from __future__ import annotations

import hashlib
import hmac
import os

import grpc

API_ENV, INTERNAL_ENV = "DSV32_API_TOKEN", "DSV32_INTERNAL_TOKEN"
INTERNAL_KEY = "x-dsv32-internal"
# probes (kubelet, up, tests) need no secret; nor do the workers' load counters (no prompt, no control)
_OPEN = ("/grpc.health.v1.Health/", "/dsv32.worker.v1.DecodeWorker/Stats", "/dsv32.worker.v1.PrefillWorker/Stats")


def secret(env: str) -> str:
    """``$ENV``, else the contents of the file ``$ENV_FILE``, else "" (off)."""
    value = os.environ.get(env, "")
    path = os.environ.get(env + "_FILE", "")
    if not value and path:
        with open(path) as f:
            value = f.read().strip()
    return value


def api_token() -> str:
    return secret(API_ENV)


def internal_token() -> str:
    return secret(INTERNAL_ENV)


def _ok(metadata, key: str, want: str) -> bool:
    got = next((v for k, v in (metadata or ()) if k == key), "")
    return hmac.compare_digest(str(got).encode(), want.encode())


def _deny(message: str, aio: bool):
    if aio:
        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    else:
        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return grpc.unary_unary_rpc_method_handler(deny)


class TokenCheck(grpc.ServerInterceptor):
    """Sync servers (workers): refuse calls without ``key: value``."""

    def __init__(self, key: str, value: str, what: str):
        self.key, self.value = key, value
        self._deny = _deny(f"{what}: missing or wrong credentials", aio=False)

    def intercept_service(self, continuation, details):
        if details.method.startswith(_OPEN) or _ok(details.invocation_metadata, self.key, self.value):
            return continuation(details)
        return self._deny


class AsyncTokenCheck(grpc.aio.ServerInterceptor):
    """The router's asyncio server: the same check."""

    def __init__(self, key: str, value: str, what: str):
        self.key, self.value = key, value
        self._deny = _deny(f"{what}: missing or wrong credentials", aio=True)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(_OPEN) or _ok(details.invocation_metadata, self.key, self.value):
            return await continuation(details)
        return self._deny


def worker_server_interceptors() -> list:
    token = internal_token()
    return [TokenCheck(INTERNAL_KEY, token, "internal worker API")] if token else []


def router_server_interceptors() -> list:
    token = api_token()
    return [AsyncTokenCheck("authorization", f"Bearer {token}", "dsv32 API")] if token else []


def _with(details, pair):
    return details._replace(metadata=[*(details.metadata or ()), pair])


# one class per call kind: grpc.aio files an interceptor under the first kind it is an instance of
class _AddMetadataUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, key: str, value: str):
        self.pair = (key, value)

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with(details, self.pair), request)


class _AddMetadataStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, key: str, value: str):
        self.pair = (key, value)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with(details, self.pair), request)


def router_client_interceptors() -> list:
    """The router's channels to workers: the internal token on every call."""
    token = internal_token()
    return [_AddMetadataUnary(INTERNAL_KEY, token), _AddMetadataStream(INTERNAL_KEY, token)] if token else []


def worker_signature(token: str, worker_id: str, role: str, endpoint: str, transfer_endpoint: str) -> str:
    msg = "\n".join((worker_id, role, endpoint, transfer_endpoint)).encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest() if token else ""


def signed_by_us(w, token: str) -> bool:
    """True if registration ``w`` (a ``WorkerInfo``) was signed with ``token`` (always without one)."""
    if not token:
        return True
    want = worker_signature(token, w.worker_id, w.role, w.endpoint, w.transfer_endpoint)
    return hmac.compare_digest(w.auth.encode(), want.encode())
