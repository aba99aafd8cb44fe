"""Issue 10, finding 11 (authentication), real processes: a router, a prefill and a decode worker
started with ``DSV32_API_TOKEN`` and ``DSV32_INTERNAL_TOKEN`` in their environment.

* the public API: no token or a wrong one → ``UNAUTHENTICATED``; the right one → served; health open;
* the internal plane: a worker call without the secret → ``UNAUTHENTICATED`` (``Stats`` stays open);
* a fake decode worker written into Redis without the secret's signature receives no request;
* ``up`` protects its own redis-server with a password (unit-level: ``RedisServer(password=...)``).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures
from unittest import mock

import grpc
import pytest
import redis

from dsv32_cluster.state import WorkerInfo
from dsv32_proto import worker_pb2, worker_pb2_grpc
from dsv32_router.client import GenerateError, generate
from roles import roles as start_roles
from roles import serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

API, INTERNAL = "api-secret-1", "internal-secret-1"


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server, tmp_path_factory):
    specs = [("prefill", ["--worker-id", "au-p0"]), ("decode", ["--worker-id", "au-d0"])]
    with mock.patch.dict(os.environ, {"DSV32_API_TOKEN": API, "DSV32_INTERNAL_TOKEN": INTERNAL}):
        with start_roles(tiny_model, redis_server, 6, "au:", tmp_path_factory.mktemp("auth-logs"), specs, 2) as c:
            yield c


def test_the_public_api_needs_the_bearer_token(cluster):
    target, _, _ = cluster
    assert serving(target), "health checks need no token"
    with mock.patch.dict(os.environ, {"DSV32_API_TOKEN": ""}):
        with pytest.raises(GenerateError) as e:
            generate(target, [5, 6, 7], max_tokens=2, timeout=30)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with mock.patch.dict(os.environ, {"DSV32_API_TOKEN": "wrong"}):
        with pytest.raises(GenerateError) as e:
            generate(target, [5, 6, 7], max_tokens=2, timeout=30)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with mock.patch.dict(os.environ, {"DSV32_API_TOKEN": API}):
        assert len(generate(target, [5, 6, 7], max_tokens=2, timeout=60).token_ids) == 2


def test_the_internal_plane_refuses_callers_without_the_secret(cluster):
    _, state, _ = cluster
    d = state.workers("decode")[0]
    with grpc.insecure_channel(d.endpoint) as ch:
        stub = worker_pb2_grpc.DecodeWorkerStub(ch)
        for md in ([], [("x-dsv32-internal", "guess")]):
            with pytest.raises(grpc.RpcError) as e:
                stub.Cancel(worker_pb2.CancelRequest(request_id="x#1"), metadata=md, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                stub.Reserve(worker_pb2.ReserveRequest(request_id="x#1", num_prompt_tokens=5, max_tokens=1,
                                                       prefill_worker_id="au-p0", lease_s=1e9), metadata=md, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not stub.Cancel(worker_pb2.CancelRequest(request_id="x#1"),
                               metadata=[("x-dsv32-internal", INTERNAL)], timeout=5).found
        assert stub.Stats(worker_pb2.StatsRequest(), timeout=5).total_pages > 0  # load counters stay open


class _Trap(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self):
        self.calls = 0

    def Reserve(self, request, context):
        self.calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "trap")


def test_a_fake_worker_without_the_secret_receives_no_prompt(cluster):
    target, state, _ = cluster
    trap = _Trap()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(trap, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    real = state.workers("decode")[0]
    fake = WorkerInfo("au-fake", "decode", f"127.0.0.1:{port}", transfer_endpoint="127.0.0.1:1", model=real.model,
                      page_size=real.page_size, free_pages=10 * real.total_pages, total_pages=10 * real.total_pages)
    stop = threading.Event()

    def keep_registered():
        while not stop.is_set():
            state.heartbeat(fake)
            stop.wait(0.5)

    t = threading.Thread(target=keep_registered, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        with mock.patch.dict(os.environ, {"DSV32_API_TOKEN": API}):
            for i in range(4):
                out = generate(target, [9, 8, 7 + i], max_tokens=2, timeout=60)
                assert out.decode_worker == real.worker_id
        assert trap.calls == 0, "the router must never call a worker whose registration it cannot verify"
    finally:
        stop.set()
        t.join(2)
        state.deregister("au-fake")
        server.stop(None)


def test_our_redis_server_wants_its_password(tmp_path):
    from dsv32_cluster.redis_server import RedisServer

    server = RedisServer(workdir=str(tmp_path), password="pw-123").start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port).ping()
        assert redis.Redis.from_url(server.url).ping()
        assert "pw-123" not in " ".join(server.proc.args)
    finally:
        server.stop()
