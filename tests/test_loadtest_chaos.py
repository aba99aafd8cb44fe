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


def test_chaos_compares_each_completed_request_with_a_fault_free_rerun(tmp_path, capsys):
    """``loadtest --chaos``: the load runs again without faults, greedy, and each request that completed
    under faults is held to its twin: identical, differing, or failed (by status; UNKNOWN is unclear)."""
    import grpc

    from dsv32_serve.cli import main
    from dsv32_loadtest.fake_server import FakeGeneration
    from test_loadtest_cli import _free_target, _strict_json, serving

    n = 10
    faults = {3: grpc.StatusCode.UNAVAILABLE, 4: grpc.StatusCode.UNKNOWN}

    class Faulty(FakeGeneration):
        """The first run (requests 0..n-1 as they arrive): two fail, one streams other tokens."""

        async def _stream(self, request, context):
            i = len(self.requests)
            async for msg in super()._stream(request, context):
                if i == 5 and msg.token_ids:
                    msg.token_ids[0] += 1
                yield msg

    server = Faulty(ttft_s=0.005, itl_s=0.001, fail=lambda i, _: faults.get(i))
    out = tmp_path / "run"
    with serving(server) as target:
        rc = main(["loadtest", "--target", target, "--num-prompts", str(n), "--input-len", "8", "--output-len",
                   "4", "--request-rate", "500", "--chaos", "kill-decode", "--chaos-every", "100",
                   "--chaos-redis-url", f"redis://{_free_target()}/0", "--output-dir", str(out),
                   "--no-progress", "--no-plots"])
    captured = capsys.readouterr()
    assert rc == 0
    assert len(server.requests) == 2 * n, "the load, then the same load again"
    assert all(r.sampling.HasField("temperature") and r.sampling.temperature == 0 for r in server.requests)
    prompts = [list(r.token_ids.ids) for r in server.requests]
    assert sorted(prompts[:n]) == sorted(prompts[n:]), "the same prompts"
    tokens = _strict_json(out / "report.json")["chaos"]["tokens"]
    assert tokens["completed"] == n - 2 and tokens["identical"] == n - 3 and tokens["differ"] == 1
    assert tokens["unverified"] == 0 and len(tokens["differ_requests"]) == 1
    assert tokens["failed"] == 2 and tokens["failed_by_status"] == {"UNAVAILABLE": 1, "UNKNOWN": 1}
    assert tokens["unclear_failures"] == 1
    assert "7 of 8 completed identical, 1 differ" in captured.out
    assert "1 requests completed with tokens other than the fault-free run's" in captured.err
