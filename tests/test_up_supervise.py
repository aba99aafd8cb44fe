"""Issue 10, finding 12 (supervision): ``up`` restarts a dead worker (with backoff; the cluster keeps
serving on the others meanwhile) and its own redis-server; a worker stopped with SIGTERM drains
(the stream it serves completes on it, not on a retry). Real ``up``, tiny checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import redis

from dsv32_cluster.state import ClusterState
from dsv32_router.client import GenerateError, generate, stream_responses
from roles import serving as router_serving
from test_up import _alive, _descendants

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_up_restarts_a_dead_worker_and_its_redis_and_a_sigterm_drains(tiny_model, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", "up", "--model", tiny_model, "--decode", "2",
                             "--port", "0", "--num-pages", "32", "--log-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    out: list[str] = []
    err: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    state = None
    try:
        _wait(lambda: any(line.startswith("ready ") for line in out) or proc.poll() is not None, 150, "not ready")
        target = next(line.split()[1] for line in out if line.startswith("ready "))
        url = next(m.group(1) for line in err if (m := re.search(r"redis (redis://\S+),", line)))
        state = ClusterState.from_url(url)
        decode = {w.worker_id: w for w in state.workers("decode")}
        assert len(decode) == 2

        # a SIGKILLed decode worker: requests keep being served, then it is back under a new pid
        victim = sorted(decode)[0]
        os.kill(decode[victim].pid, signal.SIGKILL)
        for i in range(3):
            assert len(generate(target, list(range(200 + i, 230)), max_tokens=3, timeout=60).token_ids) == 3
        _wait(lambda: any(w.worker_id == victim and w.pid != decode[victim].pid for w in state.workers("decode")),
              90, "the dead worker was not restarted")
        assert any(f"{victim} exited" in line for line in err) and any(f"{victim} restarted" in line for line in err)

        # our redis-server dies: up starts it again on its port, the workers register again, requests flow
        try:
            redis.Redis.from_url(url).shutdown(nosave=True)
        except redis.ConnectionError:
            pass
        _wait(lambda: _registered(state) == 3, 60, "workers did not re-register in the restarted Redis")
        # the router reads the registry every 0.25 s (and its Redis connection comes back on its own)
        _wait(lambda: router_serving(target), 30, "the router did not see the workers again")
        # while the workers re-register one by one the router may briefly see no pair and answer
        # UNAVAILABLE (the status a client retries on); within seconds requests flow again
        deadline = time.monotonic() + 20
        while True:
            try:
                out = generate(target, list(range(300, 330)), max_tokens=3, timeout=60)
                break
            except GenerateError as e:
                assert e.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, e
                time.sleep(0.5)
        assert len(out.token_ids) == 3

        # SIGTERM drains: the stream in flight finishes on the worker that got it
        tokens, drained, serving = [], [], None
        for msg in stream_responses(target, list(range(400, 440)), max_tokens=400, temperature=0.0,
                                    ignore_eos=True, request_id="drain-1", timeout=120):
            serving = serving or msg.decode_worker
            tokens += msg.token_ids
            if len(tokens) >= 3 and not drained:
                w = next(w for w in state.workers("decode") if w.worker_id == serving)
                os.kill(w.pid, signal.SIGTERM)
                drained.append(w)
        assert len(tokens) == 400  # ~6 s of decoding after the SIGTERM: past the old 2 s stop grace
        rec = state.request("drain-1")
        assert rec["state"] == "finished" and int(rec["attempts"]) == 1, "finished where it was, no retry"
    finally:
        pids = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        _wait(lambda: not any(_alive(p) for p in pids), 20, "children outlived up")
        if state is not None:
            state.client.close()


def _registered(state) -> int:
    try:
        return len(state.workers())
    except redis.RedisError:
        return 0
