"""End to end with expert parallelism: ``dsv32-serve decode --ep-size 2`` in a real cluster.

Roles are started one by one as a deployment would (router, one prefill worker, one decode
worker whose command starts an EP group of two rank processes, and one plain decode worker
with a small page pool, so that the router prefers the EP ranks while they are healthy),
around the session's redis-server. Each EP rank registers as its own decode target.

1. Concurrent greedy requests spread over both EP ranks, each equal to the offline ``LLM``
   token for token; afterwards every rank's page pool is full again.
2. One EP rank is SIGKILLed mid-stream: the client's stream completes on another target with
   the offline tokens (none repeated, none lost), and the group's other rank exits and both
   leave the registry within the heartbeat TTL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from dsv32_cluster.state import ClusterState
from dsv32_proto import worker_pb2, worker_pb2_grpc
from dsv32_router.client import generate, stream_responses
from test_e2e import _alive
from roles import roles as start_roles

pytestmark = pytest.mark.slow

PROMPTS = {f"p{i}": [(i * 7919 + j * 104729) % 90000 + 200 for j in range(12 + 23 * i)] for i in range(6)}
LONG = list(range(3000, 3090))
MAX_TOKENS, LONG_TOKENS = 8, 120
HEARTBEAT_TTL_S = 5.0


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server, tmp_path_factory):
    def oracle():
        from dsv32_engine import LLM, SamplingParams

        llm = LLM(model=tiny_model)
        names = list(PROMPTS)
        outs = llm.generate([PROMPTS[n] for n in names], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                                         ignore_eos=True))
        res = {n: o.outputs[0].token_ids for n, o in zip(names, outs)}
        [long] = llm.generate([LONG], SamplingParams(temperature=0.0, max_tokens=LONG_TOKENS, ignore_eos=True))
        res["long"] = long.outputs[0].token_ids
        return res

    specs = [("prefill", ["--worker-id", "ep-p0"]), ("decode", ["--worker-id", "ep-d", "--ep-size", "2"]),
             ("decode", ["--worker-id", "plain-d", "--num-pages", "40"])]
    with start_roles(tiny_model, redis_server, 5, "ep:", tmp_path_factory.mktemp("ep-logs"), specs, 4,
                     before_ready=oracle) as cluster:
        yield cluster


def _stats(w) -> worker_pb2.WorkerStats:
    with grpc.insecure_channel(w.endpoint) as ch:
        return worker_pb2_grpc.DecodeWorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)


def test_each_rank_registers_as_its_own_target(cluster):
    _, state, _ = cluster
    ranks = sorted((w for w in state.workers("decode") if w.ep_group), key=lambda w: w.ep_rank)
    assert [(w.worker_id, w.ep_group, w.ep_rank, w.ep_size) for w in ranks] == [
        ("ep-d-ep0", "ep-d", 0, 2), ("ep-d-ep1", "ep-d", 1, 2)]
    assert len({w.transfer_endpoint for w in ranks}) == 2 and len({w.pid for w in ranks}) == 2


def test_concurrent_requests_spread_over_the_ranks_and_match_offline(cluster):
    target, state, oracle = cluster
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futs = {n: pool.submit(generate, target, ids, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                               request_id=f"ep-{n}", timeout=120) for n, ids in PROMPTS.items()}
        got = {n: f.result() for n, f in futs.items()}
    for n, out in got.items():
        assert out.token_ids == oracle[n], f"{n}: cluster {out.token_ids} vs offline {oracle[n]}"
    used = {state.request(f"ep-{n}")["decode_worker"] for n in PROMPTS}
    assert {"ep-d-ep0", "ep-d-ep1"} <= used, (used, [(w.worker_id, w.free_pages, w.total_pages, w.running)
                                                      for w in state.workers("decode")])
    deadline = time.monotonic() + 10
    ranks = [w for w in state.workers("decode") if w.ep_group]
    while True:
        stats = [_stats(w) for w in ranks]
        if all(s.free_pages == s.total_pages and s.reserved_pages == 0 for s in stats):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


def test_a_killed_rank_takes_its_group_out_and_the_stream_completes_elsewhere(cluster):
    target, state, oracle = cluster
    # the router prefers the idle worker with the most free pages: wait until every load report
    # (and the router's snapshot of it) shows the earlier tests' requests gone
    deadline = time.monotonic() + 10
    while any(w.running or w.reserved_pages for w in state.workers("decode")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    ranks = {w.worker_id: w for w in state.workers("decode") if w.ep_group}
    tokens, first_on, killed_at = [], None, None
    for msg in stream_responses(target, LONG, max_tokens=LONG_TOKENS, temperature=0.0, ignore_eos=True,
                                request_id="ep-kill", timeout=120):
        first_on = first_on or msg.decode_worker
        tokens += msg.token_ids
        if len(tokens) >= 5 and killed_at is None:
            assert first_on in ranks, f"the router chose {first_on}, not an EP rank"
            os.kill(ranks["ep-d-ep1"].pid, signal.SIGKILL)  # one rank of the group serving this stream
            killed_at = time.monotonic()
    assert tokens == oracle["long"], "a retry must neither repeat nor lose tokens"
    rec = state.request("ep-kill")
    assert rec["state"] == "finished" and rec["decode_worker"] == "plain-d"
    while any(w.ep_group for w in state.workers("decode")) or any(_alive(w.pid) for w in ranks.values()):
        assert time.monotonic() - killed_at < HEARTBEAT_TTL_S + 2, "the group's ranks must be gone within the TTL"
        time.sleep(0.1)


def test_up_with_ep_groups_on_both_sides(tiny_model, tmp_path):
    """``up --prefill-ep 2 --decode-ep 2``: prefill ranks run the same EP MoE path for the prompts,
    decode ranks for the tokens; concurrent requests equal offline, every rank's pool full again,
    and ``up`` leaves no process behind."""
    from dsv32_engine import LLM, SamplingParams
    from test_e2e import _descendants

    proc = subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", "up", "--model", tiny_model, "--port", "0",
                             "--prefill-ep", "2", "--decode-ep", "2", "--log-dir", str(tmp_path), "--grace", "5"],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "up.stderr", "wb"), text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    pids: set[int] = set()
    try:
        names = list(PROMPTS)
        outs = LLM(model=tiny_model).generate([PROMPTS[n] for n in names], SamplingParams(
            temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
        oracle = {n: o.outputs[0].token_ids for n, o in zip(names, outs)}
        line = proc.stdout.readline()  # "ready HOST:PORT" once every rank is registered
        assert line.startswith("ready "), (tmp_path / "up.stderr").read_text()[-3000:]
        target = line.split()[1]
        pids = _descendants(proc.pid)
        url = next(w for w in (tmp_path / "up.stderr").read_text().split() if w.startswith("redis://")).rstrip(",")
        state = ClusterState.from_url(url)
        assert sorted(w.worker_id for w in state.workers()) == [
            "decode-0-ep0", "decode-0-ep1", "prefill-0-ep0", "prefill-0-ep1"]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futs = {n: pool.submit(generate, target, ids, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                   request_id=f"up-{n}", timeout=120) for n, ids in PROMPTS.items()}
            got = {n: f.result() for n, f in futs.items()}
        assert {n: o.token_ids for n, o in got.items()} == oracle
        records = [state.request(f"up-{n}") for n in PROMPTS]
        assert {r["decode_worker"] for r in records} == {"decode-0-ep0", "decode-0-ep1"}
        assert {r["prefill_worker"] for r in records} == {"prefill-0-ep0", "prefill-0-ep1"}
        deadline = time.monotonic() + 10
        while not all(s.free_pages == s.total_pages for s in map(_stats, state.workers("decode"))):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        state.client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, "up left processes behind"
        time.sleep(0.1)
