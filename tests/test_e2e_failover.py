"""End to end: a decode worker dies mid-stream and the client still gets the whole answer.

The cluster is assembled from the individual roles (``dsv32-serve router``,
``prefill``, ``decode`` with flags and ``DSV32_*`` environment variables, as
a deployment would run them) around the session's redis-server. The decode
worker serving a long greedy generation is killed with SIGKILL after a few
tokens; the router retries on the other decode worker, prefilling prompt +
tokens already streamed, and the concatenated stream must equal the offline
``LLM``'s output: nothing repeated, nothing lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsv32_router.client import stream_responses
from dsv32_cluster.procs import free_port
from dsv32_cluster.state import ClusterState

pytestmark = pytest.mark.slow

PROMPT = list(range(2000, 2090))
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def roles(tiny_model, redis_server, tmp_path_factory):
    url = f"redis://{redis_server.host}:{redis_server.port}/4"
    state = ClusterState.from_url(url, "fo:")
    state.client.flushdb()
    logs = tmp_path_factory.mktemp("failover-logs")
    base = {**os.environ, "OMP_NUM_THREADS": "1", "DSV32_MODEL": tiny_model, "DSV32_REDIS_URL": url,
            "DSV32_REDIS_PREFIX": "fo:"}
    port = free_port()
    specs = [("router", ["--port", str(port)]), ("prefill", ["--worker-id", "fo-p0"]),
             ("decode", ["--worker-id", "fo-d0"]), ("decode", ["--worker-id", "fo-d1"])]
    procs = []
    for role, flags in specs:
        with open(logs / f"{role}-{len(procs)}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", role, *flags], env=base,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    target = f"127.0.0.1:{port}"
    try:
        from dsv32_engine import LLM, SamplingParams

        [oracle] = LLM(model=tiny_model).generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                                            ignore_eos=True))
        deadline = time.monotonic() + 150
        while len(state.workers()) < 3 or not _serving(target):
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError("roles did not start:\n" + "\n".join(
                    f.read_text(errors="replace")[-2000:] for f in sorted(logs.glob("*.log"))))
            time.sleep(0.1)
        yield target, state, oracle.outputs[0].token_ids
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


def _serving(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_decode_worker_killed_mid_stream_the_answer_is_still_complete(roles):
    target, state, expected = roles
    tokens, victim = [], None
    for msg in stream_responses(target, PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                request_id="failover-1", timeout=120):
        if victim is None:
            victim = next(w for w in state.workers("decode") if w.worker_id == msg.decode_worker)
        tokens += msg.token_ids
        if len(tokens) >= 5 and victim.pid:
            os.kill(victim.pid, signal.SIGKILL)  # mid-stream
            victim.pid = 0
    assert tokens == expected, "a retry must neither repeat nor lose tokens"
    rec = state.request("failover-1")
    assert rec["state"] == "finished" and int(rec["attempts"]) == 2
    assert rec["decode_worker"] != victim.worker_id and victim.worker_id in rec["error"]
