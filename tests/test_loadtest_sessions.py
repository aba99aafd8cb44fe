"""Issue 12's benchmark harness: multi-turn sessions with a prefix cache, caching on vs off.

Per-turn TTFT in the report and in ``--compare``; ``Usage.cached_tokens`` (gRPC) and
``usage.prompt_tokens_details.cached_tokens`` (HTTP) per request; a hash of each request's output
so that ``--compare`` counts the requests whose tokens differ; the workers' ``Stats`` counters read
from the Redis registry around a run (``--worker-stats``). All against fakes: the scripted
Generation server (its ``page_size`` plays a prefix cache) and in-test worker ``Stats`` servers.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import json
from concurrent import futures

import grpc
import pytest
import redis

from dsv32_loadtest import Arrival, SessionWorkload, arun_load
from dsv32_loadtest._api import serving_pb2 as pb
from dsv32_loadtest._api import worker_pb2, worker_pb2_grpc
from dsv32_loadtest.compare import compare_outputs
from dsv32_loadtest.fake_server import FakeGeneration, start_fake_server
from dsv32_loadtest.metrics import OK, RequestResult, output_digest, summarize, summarize_by_turn
from dsv32_loadtest.openai_client import OpenAIClient
from dsv32_loadtest.worker_stats import WorkerStatsReader, deltas
from dsv32_serve.cli import main
from test_loadtest_cli import serving

SESSIONS = ["--workload", "sessions", "--turns", "4", "--num-prompts", "8", "--input-len", "40", "--output-len", "5",
            "--shared-prefix-len", "64", "--temperature", "0", "--arrival", "closed", "--concurrency", "2",
            "--no-progress", "--no-plots"]


def _result(index, turn, ttft, cached=None, ok=True, ids=(1, 2)):
    r = RequestResult(index=index, kind="session", turn=turn, input_tokens=100 * (turn + 1),
                      requested_output_tokens=len(ids), cached_tokens=cached, chunk_times_s=[ttft, ttft + 0.01],
                      chunk_tokens=[1] * len(ids), end_s=ttft + 0.02, status=OK if ok else "UNAVAILABLE")
    r.reply_ids = list(ids)
    r.output_hash = output_digest(ids) if ok else ""
    return r


def test_per_turn_statistics_and_cached_totals():
    rs = [_result(0, 0, 0.4, 64), _result(1, 1, 0.1, 128), _result(2, 0, 0.6, 0), _result(3, 1, 0.3, 192),
          _result(4, 1, 9.0, None, ok=False)]
    by_turn = summarize_by_turn(rs)
    assert [t["turn"] for t in by_turn] == [0, 1]
    t0, t1 = by_turn
    assert (t0["sent"], t0["completed"], t1["sent"], t1["completed"]) == (2, 2, 3, 2)
    assert t0["ttft_ms"]["median"] == pytest.approx(500.0) and t1["ttft_ms"]["median"] == pytest.approx(200.0)
    assert t1["ttft_ms"]["p99"] == pytest.approx(100 + 200 * 0.99)  # the failed request is not in it
    assert t0["mean_cached_tokens"] == 32 and t1["mean_cached_tokens"] == 160
    assert t1["mean_input_tokens"] == 200
    assert summarize(rs, 1.0)["total_cached_tokens"] == 384
    assert summarize_by_turn([_result(0, 0, 0.1)]) == []                # single-turn workloads: none
    assert summarize([_result(0, 0, 0.1)], 1.0)["total_cached_tokens"] is None  # no server said


def test_output_hash_round_trips_and_tells_outputs_apart():
    assert output_digest([1, 2, 3]) == output_digest((1, 2, 3)) != output_digest([1, 2, 4])
    assert output_digest([1, 2]) != output_digest([1, 2, 0]) and len(output_digest([])) == 16
    r = _result(0, 1, 0.1, 64)
    back = RequestResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.output_hash == r.output_hash and back.cached_tokens == 64 and "reply_ids" not in r.to_dict()


def test_compare_outputs_by_index():
    def run(*hashes):
        return {"requests": [{"index": i, "output_hash": h, "session_id": "s", "turn": i}
                             for i, h in enumerate(hashes)]}

    o = compare_outputs([(run("a", "b", "c", ""), run("a", "x", "c", "d"))])
    assert (o["compared"], o["identical"], o["differ"], o["unverified"]) == (3, 2, 1, 1)
    assert o["differ_requests"] == ["index 1 (session s, turn 2)"]


def test_grpc_client_reads_cached_tokens_and_hashes_outputs():
    async def go():
        server, target = await start_fake_server(FakeGeneration(ttft_s=0.001, itl_s=0.001, page_size=16))
        try:
            return await arun_load(target, SessionWorkload(turns=3, input_len=20, output_len=4, shared_prefix_len=32),
                                   Arrival("closed", concurrency=1), num_prompts=6, temperature=0.0)
        finally:
            await server.stop(None)

    run = asyncio.run(go()).runs[0]
    assert all(r.ok for r in run.results)
    by = {(r.session_id[-2:], r.turn): r for r in run.results}
    assert by["s0", 0].cached_tokens == 0           # nothing seen yet
    assert by["s1", 0].cached_tokens == 32          # the shared system prompt, two whole pages
    assert by["s0", 1].cached_tokens == 48          # 32 + 20 + 4 = 56 tokens of history: three pages
    for r in run.results:
        assert r.output_hash == output_digest(r.reply_ids)
    assert [t["mean_cached_tokens"] for t in run.summary_by_turn()] == [16, 48, 64]  # turn 3: 76 of 100


def test_openai_client_reads_prompt_tokens_details():
    from aiohttp import web

    async def completions(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = [{"choices": [{"token_ids": [7], "finish_reason": None}]},
                  {"choices": [{"token_ids": [8], "finish_reason": "length"}]},
                  {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                            "prompt_tokens_details": {"cached_tokens": 2}}}]
        for c in chunks:
            await resp.write(f"data: {json.dumps(c)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def go():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            async with OpenAIClient(f"127.0.0.1:{runner.addresses[0][1]}") as c:
                result = RequestResult(index=0, input_tokens=3, requested_output_tokens=2)
                req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                         sampling=pb.SamplingParams(max_tokens=2))
                await c.generate(req, result, 0.0, 10.0)
                return result
        finally:
            await runner.cleanup()

    r = asyncio.run(go())
    assert r.ok and r.cached_tokens == 2 and r.output_hash == output_digest([7, 8])


def test_sessions_report_csv_and_compare_on_vs_off(tmp_path, capsys):
    for name, servicer in (("off", FakeGeneration(ttft_s=0.04, itl_s=0.001)),
                           ("on", FakeGeneration(ttft_s=0.04, itl_s=0.001, page_size=16)),
                           ("other", FakeGeneration(ttft_s=0.04, itl_s=0.001, page_size=16, token_offset=1))):
        with serving(servicer) as target:
            assert main(["loadtest", "--target", target, *SESSIONS, "--output-dir", str(tmp_path / name)]) == 0
    out = capsys.readouterr().out
    assert "TTFT per turn (ms)" in out and "Input tokens from a prefix cache:" in out

    doc = json.loads((tmp_path / "on" / "report.json").read_text())
    run = doc["runs"][0]
    assert [t["turn"] for t in run["summary_by_turn"]] == [0, 1, 2, 3]
    assert run["summary"]["total_cached_tokens"] == sum(r["cached_tokens"] for r in run["requests"]) > 0
    assert run["worker_stats"] is None
    with open(tmp_path / "on" / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(len(r["output_hash"]) == 16 and r["cached_tokens"] != "" for r in rows)

    assert main(["loadtest", "--compare", str(tmp_path / "off" / "report.json"), str(tmp_path / "on" / "report.json"),
                 "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "p50 TTFT A" in text and "(TTFT in ms; turn 1 = a session's first)" in text
    turn4 = next(line for line in text.splitlines() if line.startswith("4 "))
    assert float(turn4.split()[3].rstrip("x")) < 0.5  # the fake charges only the uncached share of a prompt
    assert "8 requests compared by index: 8 identical, 0 differ, 0 unverified" in text

    assert main(["loadtest", "--compare", str(tmp_path / "off" / "report.json"),
                 str(tmp_path / "other" / "report.json"), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "0 identical, 8 differ" in text and "first that differ: index 0" in text


# -- worker counters ------------------------------------------------------------------------------

class FakeStats(worker_pb2_grpc.DecodeWorkerServicer, worker_pb2_grpc.PrefillWorkerServicer):
    """A worker's Stats: every call adds ``step`` to its counters (a worker at work between two reads)."""

    def __init__(self, worker_id: str, role: str, step: int, require: str = ""):
        self.worker_id, self.role, self.step, self.require = worker_id, role, step, require
        self.calls = 0
        self.metadata: list[dict] = []

    def Stats(self, request, context):
        md = dict(context.invocation_metadata())
        self.metadata.append(md)
        if self.require and md.get("x-dsv32-internal") != self.require:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "internal worker API: missing or wrong credentials")
        self.calls += 1
        n = self.calls * self.step
        prefill = self.role == "prefill"
        return worker_pb2.WorkerStats(worker_id=self.worker_id, role=self.role, prefill_forward_tokens=n,
                                      bytes_sent=10 * n if prefill else 0, bytes_received=0 if prefill else 10 * n,
                                      cached_tokens=n // 2, cached_pages=self.calls)


def _sign(token, h):
    msg = "\n".join(h.get(k, "") for k in ("worker_id", "role", "endpoint", "transfer_endpoint")).encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


@pytest.fixture
def workers(redis_url):
    """Two fake workers (prefill p0, decode d0) serving Stats, registered in Redis under ``ws:``."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    servers, fakes = [], {}
    for wid, role, step in (("p0", "prefill", 100), ("d0", "decode", 7)):
        fake = FakeStats(wid, role, step)
        server = grpc.server(futures.ThreadPoolExecutor(2))
        add = (worker_pb2_grpc.add_PrefillWorkerServicer_to_server if role == "prefill"
               else worker_pb2_grpc.add_DecodeWorkerServicer_to_server)
        add(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        fakes[wid] = fake
        h = {"worker_id": wid, "role": role, "endpoint": f"127.0.0.1:{port}", "transfer_endpoint": "",
             "started_at": "1000.0"}
        r.zadd("ws:workers", {wid: 1000})
        r.hset(f"ws:worker:{wid}", mapping=h)
    yield r, fakes
    for s in servers:
        s.stop(None)
    r.close()


def test_worker_counters_over_a_run(redis_url, workers, monkeypatch):
    monkeypatch.delenv("DSV32_INTERNAL_TOKEN", raising=False)
    reader = WorkerStatsReader(redis_url, "ws:")

    async def go():
        server, target = await start_fake_server(FakeGeneration(ttft_s=0.001, itl_s=0.001))
        try:
            return await arun_load(target, SessionWorkload(turns=2, input_len=8, output_len=2, shared_prefix_len=0),
                                   Arrival("closed", concurrency=1), num_prompts=4, worker_stats=reader)
        finally:
            await server.stop(None)

    ws = asyncio.run(go()).runs[0].worker_stats
    assert ws["notes"] == [] and set(ws["workers"]) == {"p0", "d0"}
    assert ws["totals"] == {"workers": 2, "prefill_tokens_computed": 107, "kv_bytes_sent": 1000,
                            "kv_bytes_received": 70, "cached_tokens_prefill": 50, "cached_tokens_decode": 4,
                            "cached_pages": 4, "checksum_failures": 0}


def test_deltas_name_restarted_and_missing_workers():
    def snap(started, n, role="prefill"):
        return {"role": role, "started_at": started, "prefill_forward_tokens": n, "bytes_sent": n,
                "bytes_received": 0, "cached_tokens": 0, "decode_steps": 0, "requests_finished": 0,
                "requests_aborted": 0, "checksum_failures": 0, "cached_pages": 1}

    before = {"a": snap("1", 500), "b": snap("1", 50), "gone": snap("1", 5)}
    after = {"a": snap("2", 30), "b": snap("1", 80), "new": snap("3", 9), "gone": {"role": "decode", "error": "x"}}
    d = deltas(before, after)
    assert d["workers"]["a"]["prefill_forward_tokens"] == 30       # restarted: its counts since then
    assert d["workers"]["b"]["prefill_forward_tokens"] == 30
    assert d["workers"]["new"]["prefill_forward_tokens"] == 9
    assert d["totals"]["kv_bytes_sent"] == 69 and "gone" not in d["workers"]
    notes = " ".join(d["notes"])
    assert "a: restarted" in notes and "new: no counters before" in notes and "gone: no counters after" in notes


def test_internal_token_goes_only_to_signed_registrations(redis_url, workers, monkeypatch):
    r, fakes = workers
    monkeypatch.setenv("DSV32_INTERNAL_TOKEN", "inner-1")
    fakes["p0"].require = "inner-1"
    h = r.hgetall("ws:worker:p0")
    r.hset("ws:worker:p0", "auth", _sign("inner-1", h))              # p0 signed; d0 not (someone else wrote it)
    snap = WorkerStatsReader(redis_url, "ws:").snapshot()
    assert snap["p0"]["prefill_forward_tokens"] == 100
    assert "x-dsv32-internal" not in fakes["d0"].metadata[-1]
    r.hset("ws:worker:p0", "auth", "forged")
    snap = WorkerStatsReader(redis_url, "ws:").snapshot()
    assert snap["p0"]["error"].startswith("UNAUTHENTICATED") and "error" not in snap["d0"]


def test_cli_worker_stats_in_report_summary_and_compare(redis_url, workers, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DSV32_INTERNAL_TOKEN", raising=False)
    for name in ("a", "b"):
        with serving(FakeGeneration(ttft_s=0.001, itl_s=0.001)) as target:
            rc = main(["loadtest", "--target", target, *SESSIONS, "--worker-stats", "--chaos-redis-url", redis_url,
                       "--chaos-redis-prefix", "ws:", "--output-dir", str(tmp_path / name)])
            assert rc == 0
    out = capsys.readouterr().out
    assert "Worker counters over the run" in out and "KV bytes sent (prefill):" in out
    doc = json.loads((tmp_path / "a" / "report.json").read_text())
    assert doc["runs"][0]["worker_stats"]["totals"]["kv_bytes_sent"] == 1000
    assert main(["loadtest", "--compare", str(tmp_path / "a" / "report.json"), str(tmp_path / "b" / "report.json"),
                 "--no-plots"]) == 0
    assert "worker counters over the run" in capsys.readouterr().out


def test_worker_stats_without_redis_is_a_usage_error(tmp_path, capsys):
    with serving(FakeGeneration(ttft_s=0.001, itl_s=0.001)) as target:
        rc = main(["loadtest", "--target", target, *SESSIONS, "--worker-stats", "--chaos-redis-url",
                   "redis://127.0.0.1:1/0", "--output-dir", str(tmp_path / "x")])
    assert rc == 2 and "cannot read the worker registry" in capsys.readouterr().err


def test_report_keeps_no_redis_password():
    from dsv32_loadtest.cli import _hide_password, _redacted

    assert _redacted(["--chaos-redis-url", "redis://:s3cret@127.0.0.1:1/0"]) == [
        "--chaos-redis-url", "redis://:***@127.0.0.1:1/0"]
    assert _hide_password("--chaos-redis-url=rediss://u:s3cret@h:1/0") == "--chaos-redis-url=rediss://u:***@h:1/0"
    assert _hide_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
