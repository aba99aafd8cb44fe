"""Start cluster roles one by one, as a deployment would (``dsv32-serve router``, ``prefill``,
``decode`` ... with flags and ``DSV32_*`` variables), around the session's redis-server.

Used by the end-to-end tests that need to kill or stop one worker without ``up`` stopping the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsv32_cluster.procs import free_port
from dsv32_cluster.state import ClusterState


def serving(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


@contextmanager
def roles(model: str, redis_server, db: int, prefix: str, logs: Path, specs: list[tuple[str, list[str]]],
          registered: int, before_ready=None, ready_timeout: float = 180) -> Iterator[tuple[str, ClusterState, object]]:
    """Start a router (first) and the worker ``specs`` (role, flags); yield ``(target, state, extra)`` once
    ``registered`` workers are in Redis and the router is SERVING. ``before_ready()`` runs while they start
    (e.g. the offline oracle) and its result is ``extra``. Every process group is stopped on exit."""
    url = f"redis://{redis_server.host}:{redis_server.port}/{db}"
    state = ClusterState.from_url(url, prefix)
    state.client.flushdb()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSV32_MODEL": model, "DSV32_REDIS_URL": url,
           "DSV32_REDIS_PREFIX": prefix}
    port = free_port()
    procs = []
    for role, flags in [("router", ["--port", str(port)]), *specs]:
        with open(logs / f"{role}-{len(procs)}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", role, *flags], env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    target = f"127.0.0.1:{port}"
    try:
        extra = before_ready() if before_ready else None
        deadline = time.monotonic() + ready_timeout
        while len(state.workers()) < registered or not serving(target):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("roles did not start:\n" + "\n".join(
                    f.read_text(errors="replace")[-2000:] for f in sorted(logs.glob("*.log"))))
            time.sleep(0.1)
        time.sleep(1.0)  # the router refreshes its registry snapshot every 0.25 s: let it see every worker
        yield target, state, extra
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        state.client.close()
