"""End to end: ``dsv32-serve up`` with 2 prefill + 2 decode workers, a router and a
private redis-server, all real processes on loopback, on the tiny checkpoint.

One cluster serves the whole module (starting one costs ~20 s on 2 cores);
the last test shuts it down and checks that no process is left. Greedy (and
seeded) outputs are compared with the offline ``LLM`` on the same checkpoint,
computed in this process while the cluster starts.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from dsv32_proto import worker_pb2, worker_pb2_grpc
from dsv32_router.client import GenerateError, generate, stream_responses
from dsv32_cluster.state import ClusterState

pytestmark = pytest.mark.slow

MAX_TOKENS = 10
_rng = random.Random(0)
PROMPTS = {  # name -> token ids
    "short": [_rng.randrange(100, 100_000) for _ in range(21)],  # shorter than a page
    "pages": [_rng.randrange(100, 100_000) for _ in range(150)],  # several pages
    "long": [_rng.randrange(100, 100_000) for _ in range(300)],  # > index_topk (64): sparse attention selects
}
TEXT_PROMPT = "The disaggregated cluster streams tokens"
SEEDED = dict(temperature=0.9, top_p=0.95, seed=1234)
INTERNAL_TOKEN = "e2e-internal-plane"  # up keeps a token it is given (the internal API needs it)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Cluster:
    def __init__(self, proc: subprocess.Popen, target: str, redis_url: str, log_dir: Path, model: str):
        self.proc, self.target, self.redis_url, self.log_dir, self.model = proc, target, redis_url, log_dir, model
        self.state = ClusterState.from_url(redis_url)
        self.pids = _descendants(proc.pid)

    def workers(self, role: str | None = None):
        return sorted(self.state.workers(role), key=lambda w: w.worker_id)

    def stats(self, w) -> worker_pb2.WorkerStats:
        with grpc.insecure_channel(w.endpoint) as ch:
            stub = (worker_pb2_grpc.DecodeWorkerStub if w.role == "decode" else worker_pb2_grpc.PrefillWorkerStub)(ch)
            return stub.Stats(worker_pb2.StatsRequest(), timeout=5)

    def inject(self, kind: str, count: int = 1) -> None:
        for w in self.workers("prefill"):
            with grpc.insecure_channel(w.endpoint) as ch:
                worker_pb2_grpc.PrefillWorkerStub(ch).InjectFault(worker_pb2.FaultRequest(kind=kind, count=count),
                                                                  metadata=[("x-dsv32-internal", INTERNAL_TOKEN)],
                                                                  timeout=5)

    def wait_pools_full(self, timeout: float = 10.0) -> dict[str, worker_pb2.WorkerStats]:
        deadline = time.monotonic() + timeout
        while True:
            stats = {w.worker_id: self.stats(w) for w in self.workers("decode")}
            if all(s.free_pages == s.total_pages and s.running_requests == 0 and s.reserved_pages == 0
                   for s in stats.values()) or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))


def _oracle(model: str) -> dict:
    from dsv32_engine import LLM, SamplingParams

    llm = LLM(model=model)
    names = list(PROMPTS)
    outs = llm.generate([PROMPTS[n] for n in names] + [TEXT_PROMPT],
                        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    res = {n: o.outputs[0].token_ids for n, o in zip(names + ["text"], outs)}
    [seeded] = llm.generate([PROMPTS["pages"]], SamplingParams(max_tokens=MAX_TOKENS, **SEEDED))
    res["seeded"] = seeded.outputs[0].token_ids
    [lp] = llm.generate([PROMPTS["short"]], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3))
    res["logprobs"] = lp.outputs[0].token_ids
    res["logprobs_values"] = lp.outputs[0].logprobs
    return res


@pytest.fixture(scope="module")
def e2e(tiny_model, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("up-logs")
    err = open(log_dir / "up.stderr", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", "up", "--model", tiny_model, "--prefill", "2",
                             "--decode", "2", "--port", "0", "--enable-fault-injection", "--log-dir", str(log_dir),
                             "--prefill-arg=--max-num-batched-tokens=128",
                             "--grace", "5"], stdout=subprocess.PIPE, stderr=err, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DSV32_INTERNAL_TOKEN": INTERNAL_TOKEN})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        oracle = _oracle(tiny_model)  # overlaps with the cluster's start
        deadline = time.monotonic() + 180
        while not any(line.startswith("ready ") for line in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"up did not become ready:\n{(log_dir / 'up.stderr').read_text()}")
            time.sleep(0.1)
        target = next(line for line in lines if line.startswith("ready ")).split()[1]
        redis_url = re.search(r"redis (redis://\S+),", (log_dir / "up.stderr").read_text()).group(1)
        cluster = Cluster(proc, target, redis_url, log_dir, tiny_model)
        yield cluster, oracle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        err.close()


def test_greedy_and_seeded_match_offline_llm_concurrently(e2e):
    cluster, oracle = e2e
    jobs = {n: dict(prompt=ids, temperature=0.0) for n, ids in PROMPTS.items()}
    jobs["text"] = dict(prompt=TEXT_PROMPT, temperature=0.0)
    jobs["seeded"] = dict(prompt=PROMPTS["pages"], **SEEDED)
    jobs["logprobs"] = dict(prompt=PROMPTS["short"], temperature=0.0, logprobs=3)
    with ThreadPoolExecutor(len(jobs)) as pool:
        futs = {n: pool.submit(generate, cluster.target, kw.pop("prompt"), max_tokens=MAX_TOKENS, timeout=120, **kw)
                for n, kw in jobs.items()}
        got = {n: f.result() for n, f in futs.items()}
    for name, out in got.items():
        assert out.token_ids == oracle[name], f"{name}: router {out.token_ids} vs offline {oracle[name]}"
        assert out.finish_reason in ("length", "stop") and out.usage.completion_tokens == len(out.token_ids)
        assert out.usage.time_to_first_token_s > 0
    lps = got["logprobs"].logprobs
    assert [lp.token_id for lp in lps] == oracle["logprobs"]
    for lp, want in zip(lps, oracle["logprobs_values"]):
        assert len(lp.top) == 3 and lp.top[0].token_id == lp.token_id  # greedy: the chosen token is the top one
        assert abs(lp.logprob - want[lp.token_id]) < 1e-3
        for t in lp.top:
            assert abs(t.logprob - want[t.token_id]) < 1e-3


def test_kv_really_crossed_and_a_corrupted_transfer_is_retried(e2e):
    from dsv32_engine.config import ModelConfig
    from dsv32_kernels.layout import CacheLayout

    cluster, oracle = e2e
    before = {w.worker_id: cluster.stats(w) for w in cluster.workers()}
    # (skip_prefix_cache: earlier tests sent this prompt, and a cached prefix would not cross)
    out = generate(cluster.target, PROMPTS["pages"], max_tokens=MAX_TOKENS, temperature=0.0, request_id="kv-1",
                   skip_prefix_cache=True)
    assert out.token_ids == oracle["pages"]
    after = {w.worker_id: cluster.stats(w) for w in cluster.workers()}
    p, d = before[out.prefill_worker], before[out.decode_worker]
    p2, d2 = after[out.prefill_worker], after[out.decode_worker]
    cfg = ModelConfig.from_dir(cluster.model)
    layout = CacheLayout(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim, mode="exact")
    expected = layout.pages_for(len(PROMPTS["pages"])) * cfg.num_hidden_layers * (
        layout.latent_page_bytes + layout.index_page_bytes)
    assert p2.bytes_sent - p.bytes_sent == expected
    assert d2.bytes_received - d.bytes_received == expected
    assert p2.prefill_forward_tokens - p.prefill_forward_tokens == len(PROMPTS["pages"])
    for wid, s in after.items():
        if s.role == "decode":
            assert s.prefill_forward_tokens == before[wid].prefill_forward_tokens, f"{wid} ran a prompt's forward pass"
    rec = cluster.state.request("kv-1")
    assert int(rec["sent_bytes"]) == int(rec["received_bytes"]) == expected

    # Corrupt the next transfer of every prefill worker (indexer bytes, after the sender's checksum).
    failures_before = sum(s.checksum_failures for s in after.values() if s.role == "decode")
    cluster.inject("corrupt_index", 1)
    try:
        out = generate(cluster.target, PROMPTS["long"], max_tokens=MAX_TOKENS, temperature=0.0, request_id="kv-bad",
                       skip_prefix_cache=True)
    finally:
        cluster.inject("none")
    assert out.token_ids == oracle["long"], "the retried answer is the right one, not garbage"
    rec = cluster.state.request("kv-bad")
    attempts = int(rec["attempts"])
    assert rec["state"] == "finished" and attempts >= 2 and "checksum" in rec["error"].lower()
    failures = sum(cluster.stats(w).checksum_failures for w in cluster.workers("decode"))
    assert failures - failures_before == attempts - 1
    cluster.wait_pools_full()


def test_spread_sessions_and_redis_records(e2e):
    cluster, _ = e2e
    roles = {w.worker_id: w.role for w in cluster.workers()}
    assert sorted(roles.values()) == ["decode", "decode", "prefill", "prefill"]
    deadline = time.monotonic() + 10  # let earlier tests' load drain from the reports first
    while any(w.queued_tokens or w.running for w in cluster.workers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the router's registry snapshot refreshes every 0.25 s
    ids = [f"spread-{i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: generate(cluster.target, PROMPTS["short"][i:] + [7], max_tokens=4,
                                                temperature=0.0, request_id=ids[i], timeout=120), range(8)))
    assert {o.decode_worker for o in outs} == {w for w, r in roles.items() if r == "decode"}
    assert {o.prefill_worker for o in outs} == {w for w, r in roles.items() if r == "prefill"}
    for rid, o in zip(ids, outs):
        rec = cluster.state.request(rid)
        assert rec["state"] == "finished" and rec["decode_worker"] == o.decode_worker
        assert rec["prefill_worker"] == o.prefill_worker and int(rec["completion_tokens"]) == 4
    first = generate(cluster.target, "Hello there", max_tokens=3, temperature=0.0, session_id="chat-1")
    history = "Hello there" + first.text + " And then?"
    for _ in range(2):
        again = generate(cluster.target, history, max_tokens=3, temperature=0.0, session_id="chat-1")
        assert again.decode_worker == first.decode_worker, "a session's turns stay on its decode worker"
    sess = cluster.state.session("chat-1")
    assert sess["turns"] == "3" and sess["decode_worker"] == first.decode_worker
    assert len(cluster.state.session_turns("chat-1")) == 3


def test_cancel_and_deadline_free_the_decode_pages(e2e):
    cluster, _ = e2e
    it = stream_responses(cluster.target, PROMPTS["pages"], max_tokens=3000, temperature=0.0, ignore_eos=True,
                         request_id="cancel-e2e")
    first = next(it)
    next(it)
    busy = cluster.stats(next(w for w in cluster.workers("decode") if w.worker_id == first.decode_worker))
    assert busy.running_requests == 1 and busy.free_pages < busy.total_pages
    it.close()
    stats = cluster.wait_pools_full()
    for s in stats.values():
        assert (s.free_pages, s.running_requests, s.reserved_pages) == (s.total_pages, 0, 0)
    deadline = time.monotonic() + 5
    while cluster.state.request("cancel-e2e")["state"] != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.state.request("cancel-e2e")["state"] == "cancelled"

    with pytest.raises(GenerateError) as e:
        generate(cluster.target, PROMPTS["pages"], max_tokens=3000, temperature=0.0, ignore_eos=True,
                 request_id="deadline-e2e", timeout=1.5)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = cluster.wait_pools_full()
    for s in stats.values():
        assert (s.free_pages, s.running_requests, s.reserved_pages) == (s.total_pages, 0, 0)
    deadline = time.monotonic() + 5
    while cluster.state.request("deadline-e2e")["state"] != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    rec = cluster.state.request("deadline-e2e")
    assert rec["state"] == "cancelled" and "deadline" in rec["error"]


BAD = [
    (dict(prompt=""), "INVALID_ARGUMENT", "prompt"),
    (dict(prompt=[1] * 4096), "OUT_OF_RANGE", "token_ids"),
    (dict(prompt="hi", temperature=-1.0), "INVALID_ARGUMENT", "sampling.temperature"),
    (dict(prompt="hi", top_p=1.01), "INVALID_ARGUMENT", "sampling.top_p"),
    (dict(prompt="hi", max_tokens=0), "INVALID_ARGUMENT", "sampling.max_tokens"),
    (dict(prompt="hi", max_tokens=1_000_000), "INVALID_ARGUMENT", "sampling.max_tokens"),
    (dict(prompt="hi", model="not-this-one"), "NOT_FOUND", "model"),
    (dict(prompt=[5, 129280]), "INVALID_ARGUMENT", "token_ids.ids[1]"),
]


def test_bad_input_gets_the_right_status_and_disturbs_no_worker(e2e):
    cluster, _ = e2e
    before = {w.worker_id: cluster.stats(w) for w in cluster.workers()}
    for kwargs, code, field in BAD:
        kwargs = dict(kwargs)
        with pytest.raises(GenerateError) as e:
            generate(cluster.target, kwargs.pop("prompt"), **kwargs)
        assert (e.value.code.name, e.value.details.split(":")[0]) == (code, field), e.value
    after = {w.worker_id: cluster.stats(w) for w in cluster.workers()}
    assert after == before, "no worker saw any of it"


def test_up_shuts_down_with_no_process_left(e2e):
    cluster, _ = e2e
    pids = cluster.pids | _descendants(cluster.proc.pid)
    assert len(pids) >= 6, f"expected redis, router and 4 workers under up, found {pids}"
    cluster.proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert cluster.proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "processes left behind after up stopped"
