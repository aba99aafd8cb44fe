"""End to end, the colocated baseline: ``dsv32-serve up --colocated`` with 2 colocated
workers (the process count of a 1 prefill + 1 decode cluster), a router and a
private redis-server, real processes on loopback, on the tiny checkpoint.

One cluster serves the module; the last test shuts it down. Each worker runs
whole requests (chunked prefill mixed into its decode batches), so concurrent
greedy answers must still equal the offline ``LLM``'s, no KV may cross, and
a cancelled stream must give its pages back.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from dsv32_proto import worker_pb2, worker_pb2_grpc
from dsv32_router.client import GenerateError, generate, stream_responses
from dsv32_cluster.state import ClusterState
from test_e2e import PROMPTS, _alive, _descendants

pytestmark = pytest.mark.slow

MAX_TOKENS = 10
SEEDED = dict(temperature=0.9, top_p=0.95, seed=77)


class Colocated:
    def __init__(self, proc: subprocess.Popen, target: str, redis_url: str):
        self.proc, self.target = proc, target
        self.state = ClusterState.from_url(redis_url)
        self.pids = _descendants(proc.pid)

    def workers(self):
        return sorted(self.state.workers(), key=lambda w: w.worker_id)

    def stats(self) -> dict[str, worker_pb2.WorkerStats]:
        out = {}
        for w in self.workers():
            with grpc.insecure_channel(w.endpoint) as ch:
                out[w.worker_id] = worker_pb2_grpc.DecodeWorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)
        return out

    def wait_pools_full(self, timeout: float = 10.0) -> dict[str, worker_pb2.WorkerStats]:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if all(s.free_pages == s.total_pages and s.running_requests == 0 and s.queued_requests == 0
                   for s in stats.values()) or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    def wait_state(self, rid: str, want: str, timeout: float = 5.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while self.state.request(rid).get("state") != want and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.state.request(rid)


def _oracle(model: str) -> dict:
    from dsv32_engine import LLM, SamplingParams

    llm = LLM(model=model)
    names = list(PROMPTS)
    outs = llm.generate([PROMPTS[n] for n in names], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    res = {n: o.outputs[0].token_ids for n, o in zip(names, outs)}
    [seeded] = llm.generate([PROMPTS["long"]], SamplingParams(max_tokens=MAX_TOKENS, **SEEDED))
    res["seeded"] = seeded.outputs[0].token_ids
    return res


@pytest.fixture(scope="module")
def coloc(tiny_model, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("up-colocated-logs")
    err = open(log_dir / "up.stderr", "wb")
    # a small chunk budget: the 300-token prompt is prefilled in 3 steps mixed into the others' decodes
    proc = subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", "up", "--model", tiny_model, "--colocated",
                             "--workers", "2", "--port", "0", "--log-dir", str(log_dir),
                             "--max-num-batched-tokens", "128", "--grace", "5"],
                            stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        oracle = _oracle(tiny_model)  # overlaps with the cluster's start
        deadline = time.monotonic() + 180
        while not any(line.startswith("ready ") for line in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"up --colocated did not become ready:\n{(log_dir / 'up.stderr').read_text()}")
            time.sleep(0.1)
        target = next(line for line in lines if line.startswith("ready ")).split()[1]
        redis_url = re.search(r"redis (redis://\S+),", (log_dir / "up.stderr").read_text()).group(1)
        yield Colocated(proc, target, redis_url), oracle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        err.close()


def test_concurrent_greedy_and_seeded_match_offline_llm_on_colocated_workers(coloc):
    cluster, oracle = coloc
    workers = cluster.workers()
    assert [w.role for w in workers] == ["colocated", "colocated"] and not [w for w in workers if w.transfer_endpoint]
    jobs = {n: dict(prompt=ids, temperature=0.0) for n, ids in PROMPTS.items()}
    jobs["seeded"] = dict(prompt=PROMPTS["long"], **SEEDED)
    with ThreadPoolExecutor(len(jobs)) as pool:
        futs = {n: pool.submit(generate, cluster.target, kw.pop("prompt"), max_tokens=MAX_TOKENS, timeout=120,
                               request_id=f"co-{n}", **kw) for n, kw in jobs.items()}
        got = {n: f.result() for n, f in futs.items()}
    for name, out in got.items():
        assert out.token_ids == oracle[name], f"{name}: colocated {out.token_ids} vs offline {oracle[name]}"
        assert out.finish_reason == "length" and out.usage.completion_tokens == MAX_TOKENS
        assert out.prefill_worker == out.decode_worker, "one worker runs the whole request"
        rec = cluster.state.request(f"co-{name}")
        assert rec["state"] == "finished" and rec["decode_worker"] == out.decode_worker
        assert "prefilling_at" in rec and "decoding_at" in rec and "transferring_at" not in rec
        assert float(rec["prefilling_at"]) <= float(rec["decoding_at"]) <= float(rec["finished_at"])
    assert {o.decode_worker for o in got.values()} == {w.worker_id for w in workers}, "the load is spread"
    stats = cluster.wait_pools_full()
    assert all(s.role == "colocated" and s.bytes_received == 0 and s.bytes_sent == 0 for s in stats.values())
    prompt_tokens = sum(len(PROMPTS[n]) for n in PROMPTS) + len(PROMPTS["long"])
    assert sum(s.prefill_forward_tokens for s in stats.values()) >= prompt_tokens, "the workers ran the prompts"


def test_cancel_and_deadline_free_the_pages(coloc):
    cluster, _ = coloc
    it = stream_responses(cluster.target, PROMPTS["pages"], max_tokens=3000, temperature=0.0, ignore_eos=True,
                          request_id="co-cancel")
    first = next(it)
    next(it)
    busy = cluster.stats()[first.decode_worker]
    assert busy.running_requests == 1 and busy.free_pages < busy.total_pages
    it.close()
    for s in cluster.wait_pools_full().values():
        assert (s.free_pages, s.running_requests, s.queued_requests) == (s.total_pages, 0, 0)
    assert cluster.wait_state("co-cancel", "cancelled")["state"] == "cancelled"

    with pytest.raises(GenerateError) as e:
        generate(cluster.target, PROMPTS["pages"], max_tokens=3000, temperature=0.0, ignore_eos=True,
                 request_id="co-deadline", timeout=1.5)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    for s in cluster.wait_pools_full().values():
        assert (s.free_pages, s.running_requests, s.queued_requests) == (s.total_pages, 0, 0)
    rec = cluster.wait_state("co-deadline", "cancelled")
    assert rec["state"] == "cancelled" and "deadline" in rec["error"]


def test_up_colocated_shuts_down_with_no_process_left(coloc):
    cluster, _ = coloc
    pids = cluster.pids | _descendants(cluster.proc.pid)
    assert len(pids) >= 4, f"expected redis, router and 2 colocated workers under up, found {pids}"
    cluster.proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert cluster.proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "processes left behind after up --colocated stopped"
