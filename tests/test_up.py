"""``dsv32-serve up`` process management: readiness, external Redis, no orphans.

(Ctrl-C of a healthy cluster is covered at the end of test_e2e.py; here ``up``
itself is killed with SIGKILL, which it cannot handle: its children must still
go, through PR_SET_PDEATHSIG.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from dsv32_cluster.state import ClusterState
from test_e2e import _alive, _descendants

pytestmark = pytest.mark.slow


def test_up_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dsv32_serve.cli", "up", "--model", str(tmp_path), "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "not a checkpoint directory" in out.stderr


def test_up_with_an_external_redis_then_sigkill_leaves_no_orphans(tiny_model, redis_server, tmp_path):
    url = f"redis://{redis_server.host}:{redis_server.port}/3"
    state = ClusterState.from_url(url, "upk:")
    state.client.flushdb()
    proc = subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", "up", "--model", tiny_model, "--redis-url", url,
                             "--redis-prefix", "upk:", "--port", "0", "--num-pages", "32", "--log-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 150
        while not any(line.startswith("ready ") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "up did not become ready"
            time.sleep(0.1)
        workers = state.workers()
        assert sorted(w.role for w in workers) == ["decode", "prefill"]
        assert all(w.worker_id.startswith(("prefill-0-", "decode-0-")) for w in workers), "ids unique per up"
        assert all(w.total_pages == 32 for w in workers)
        pids = _descendants(proc.pid)
        assert len(pids) == 3, "router + 2 workers, no redis-server of its own"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)], "children outlived a SIGKILLed up"
        deadline = time.monotonic() + 10
        while state.workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state.workers() == [], "workers deregister (or expire) once gone"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _descendants(proc.pid):
            os.kill(p, signal.SIGKILL)
        state.client.close()


def test_a_wrapped_program_dies_with_its_parent(tmp_path):
    # what `up` does for redis-server: the parent is SIGKILLed, the child gets SIGTERM from the kernel
    code = ("import sys, time; from dsv32_cluster.redis_server import RedisServer; "
            f"r = RedisServer(workdir={str(tmp_path)!r}, die_with_parent=True).start(); "
            "print(r.proc.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child) and "redis-server" in open(f"/proc/{child}/cmdline").read()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
