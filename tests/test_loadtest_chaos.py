"""``loadtest --chaos``: faults are injected into the registry's workers of a role (never the last one)
and each one's recovery time is measured from the registry (issue 10, the benchmark's harness)."""

from __future__ import annotations

import subprocess
import time

import redis

from dsv32_loadtest.chaos import Chaos


def _register(r, prefix, wid, role, pid):
    now = time.time()
    r.zadd(f"{prefix}workers", {wid: now})
    r.hset(f"{prefix}worker:{wid}", mapping={"worker_id": wid, "role": role, "pid": pid, "started_at": now,
                                              "updated_at": now})


def test_kill_decode_hits_one_worker_and_measures_its_recovery(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        _register(r, "ch:", "d0", "decode", procs[0].pid)
        _register(r, "ch:", "d1", "decode", procs[1].pid)
        _register(r, "ch:", "p0", "prefill", procs[2].pid)
        chaos = Chaos("kill-decode", redis_url, "ch:", every_s=0.3).start()
        deadline = time.monotonic() + 5
        while not chaos.faults and time.monotonic() < deadline:
            time.sleep(0.02)
        [fault] = chaos.faults[:1]
        assert fault.worker_id == "d0" and procs[0].wait(5) == -9
        time.sleep(0.5)  # "restarted": a registration newer than the fault
        restarted = subprocess.Popen(["sleep", "60"])
        procs.append(restarted)
        _register(r, "ch:", "d0", "decode", restarted.pid)
        faults = chaos.stop(settle_s=3)
        assert faults[0].recovered_s is not None and 0.4 < faults[0].recovered_s < 2.5
        assert procs[2].poll() is None, "a prefill worker is not a decode worker"
        assert chaos.summary()["faults"] == len(faults) >= 1
    finally:
        for p in procs:
            p.kill()
        r.close()


def test_never_the_last_worker_of_a_role(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    p = subprocess.Popen(["sleep", "60"])
    try:
        _register(r, "ch1:", "d0", "decode", p.pid)
        chaos = Chaos("kill-decode", redis_url, "ch1:", every_s=0.1).start()
        time.sleep(0.5)
        assert chaos.stop(settle_s=0) == [] and p.poll() is None
    finally:
        p.kill()
        r.close()
