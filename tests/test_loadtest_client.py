"""The async harness against an in-test grpc.aio Generation server that streams a known sequence.

A unit test of the harness (accounting, timing consistency, error classes, a
dead target, a server dying mid-run); the end-to-end test against a live
``dsv32-serve up`` calls the same ``run_load`` with that cluster's target.
"""

import asyncio
import json
import os
import signal
import socket

import grpc
import pytest

from dsv32_loadtest import Arrival, SessionWorkload, Slo, SyntheticWorkload, TargetError, TraceWorkload, arun_load
from dsv32_loadtest._api import serving_pb2 as pb
from dsv32_loadtest.client import check_target, is_loopback
from dsv32_loadtest.fake_server import FakeGeneration, start_fake_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _with_server(servicer, fn):
    server, target = await start_fake_server(servicer)
    try:
        return await fn(target, server)
    finally:
        await server.stop(None)


def test_every_request_accounted_and_consistent():
    servicer = FakeGeneration(ttft_s=0.02, itl_s=0.002, tokens_per_chunk=2)

    async def go(target, _):
        return await arun_load(target, SyntheticWorkload(input_len=40, output_len=9, range_ratio=0.5),
                               Arrival("poisson", rate=300, seed=1), num_prompts=30, connections=2,
                               slo=Slo(ttft_ms=10_000), progress=True)

    report = asyncio.run(_with_server(servicer, go))
    run = report.runs[0]
    s = run.summary(report.slo)
    assert (s["planned"], s["completed"], s["failed"], s["not_sent"]) == (30, 30, 0, 0)
    assert s["good_requests"] == 30 and s["output_len_mismatches"] == 0
    assert s["server_token_count_mismatches"] == 0
    assert s["send_lag_ms"]["count"] == 30 and s["send_lag_ms"]["min"] >= 0
    assert sorted(r.index for r in run.results) == list(range(30))
    assert report.models[0]["id"] == "fake"
    sent = {r.request_id: r for r in servicer.requests}
    for r in run.results:
        assert r.ok and r.finish_reason == "length"
        assert r.e2e_s >= r.ttft_s >= 0.02                                # the server waits 20 ms
        assert r.output_tokens == r.requested_output_tokens == r.server_completion_tokens
        assert r.input_tokens == r.server_prompt_tokens
        assert len(r.chunk_tokens) == (r.output_tokens + 1) // 2 and len(r.itl_s) == len(r.chunk_tokens) - 1
        req = sent[r.request_id]
        assert req.sampling.ignore_eos and req.sampling.max_tokens == r.requested_output_tokens
        assert len(req.token_ids.ids) == r.input_tokens
        # the known sequence: token k of the reply is (prompt length + k) % vocab
        assert r.reply_ids == [r.input_tokens + k for k in range(r.output_tokens)]
        assert r.prefill_worker == "fake-p0" and r.decode_worker == "fake-d0"
    assert run.duration_s >= max(r.start_s + r.e2e_s for r in run.results) - 1e-9


def _rule(i, request):
    return {1: grpc.StatusCode.RESOURCE_EXHAUSTED, 3: grpc.StatusCode.INVALID_ARGUMENT}.get(i % 5)


class _Odd(FakeGeneration):
    """Request 0 ends OK without a token; request 1 ends with finish_reason abort; the rest are fine."""

    async def _stream(self, request, context):
        i = len(self.requests)
        if i == 0:
            self.requests.append(request)
            return
        if i == 1:
            self.requests.append(request)
            yield pb.GenerateResponse(token_ids=[5], finish_reason="abort")
            return
        async for m in super()._stream(request, context):
            yield m


@pytest.mark.parametrize("servicer, timeout_s, expected", [
    (lambda: FakeGeneration(fail=_rule), 30, {"RESOURCE_EXHAUSTED": 4, "INVALID_ARGUMENT": 4}),
    (lambda: FakeGeneration(fail=lambda i, r: grpc.StatusCode.INTERNAL if i < 3 else None, fail_after_tokens=3),
     30, {"INTERNAL": 3}),
    (lambda: _Odd(), 30, {"EMPTY_STREAM": 1, "FINISH_ABORT": 1}),
    (lambda: FakeGeneration(ttft_s=2.0), 0.2, {"DEADLINE_EXCEEDED": 20}),
], ids=["before-first-token", "mid-stream", "harness-classes", "deadline"])
def test_errors_classified_by_status_code(servicer, timeout_s, expected):
    async def go(target, _):
        return await arun_load(target, SyntheticWorkload(input_len=8, output_len=6), Arrival("burst"),
                               num_prompts=20, request_timeout_s=timeout_s)

    report = asyncio.run(_with_server(servicer(), go))
    s = report.runs[0].summary(None)
    assert s["errors"] == expected
    assert s["failed"] == sum(expected.values()) and s["completed"] + s["failed"] == 20
    for r in report.runs[0].results:
        assert r.ok or (r.error and r.end_s is not None)
    if "INTERNAL" in expected:  # failed mid-stream: the tokens before the failure were seen
        assert all(r.output_tokens == 3 for r in report.runs[0].results if r.status == "INTERNAL")


def test_dead_target_is_a_target_error():
    target = f"127.0.0.1:{_free_port()}"
    with pytest.raises(TargetError, match=f"no dsv32 Generation server answers at {target}: UNAVAILABLE"):
        asyncio.run(arun_load(target, SyntheticWorkload(), num_prompts=1, probe_timeout_s=2))


@pytest.mark.parametrize("target", ["127.0.0.1:1", "localhost:5", "[::1]:7", "ipv4:127.0.0.2:9",
                                    "dns:///localhost:50051", "unix:/tmp/x.sock"])
def test_loopback_targets_accepted(target):
    check_target(target)
    assert is_loopback(target)


@pytest.mark.parametrize("target", ["10.0.0.1:50051", "example.com:443", "[2001:db8::1]:1", "router.serving:50051"])
def test_remote_targets_accepted(target):
    check_target(target)  # loopback is the default target, not a rule
    assert not is_loopback(target)


@pytest.mark.parametrize("target", ["example.com", "10.0.0.1:x", "[::1]", "host:0", ":50051"])
def test_malformed_targets_refused(target):
    with pytest.raises(TargetError, match="expected HOST:PORT"):
        check_target(target)


def test_server_dying_mid_run_gives_a_partial_report():
    servicer = FakeGeneration(ttft_s=0.02, itl_s=0.005)

    async def go(target, server):
        async def kill_after_five():
            while servicer.finished < 5:
                await asyncio.sleep(0.005)
            await server.stop(None)

        killer = asyncio.create_task(kill_after_five())
        report = await arun_load(target, SyntheticWorkload(input_len=8, output_len=10),
                                 Arrival("poisson", rate=60, seed=2), num_prompts=200,
                                 abort_after_unavailable=5)
        await killer
        return report

    report = asyncio.run(_with_server(servicer, go))
    run = report.runs[0]
    s = run.summary(None)
    assert run.aborted.startswith("target unavailable")
    assert s["completed"] >= 5 and s["failed"] >= 5 and s["not_sent"] > 0
    assert s["completed"] + s["failed"] + s["not_sent"] == s["planned"] == 200
    assert s["errors"].get("UNAVAILABLE", 0) >= 5
    assert run.duration_s < 3.0  # it stopped, rather than failing the remaining ~3 s of arrivals


def test_time_limit_stops_launching():
    async def go(target, _):
        return await arun_load(target, SyntheticWorkload(input_len=4, output_len=2),
                               Arrival("poisson", rate=20, seed=0), num_prompts=500, max_duration_s=0.3)

    run = asyncio.run(_with_server(FakeGeneration(), go)).runs[0]
    s = run.summary(None)
    assert run.aborted.startswith("time limit") and s["not_sent"] > 400
    assert s["completed"] + s["failed"] + s["not_sent"] == 500 and s["failed"] == 0


def test_closed_loop_respects_the_concurrency_cap():
    servicer = FakeGeneration(ttft_s=0.05, itl_s=0.002)

    async def go(target, _):
        return await arun_load(target, SyntheticWorkload(input_len=4, output_len=4),
                               Arrival("closed", concurrency=3), num_prompts=24)

    run = asyncio.run(_with_server(servicer, go)).runs[0]
    assert run.summary(None)["completed"] == 24
    assert servicer.max_in_flight == 3
    assert all(r.scheduled_s is None for r in run.results)


def test_sessions_send_their_growing_history():
    servicer = FakeGeneration(ttft_s=0.005, itl_s=0.001)

    async def go(target, _):
        return await arun_load(target, SessionWorkload(turns=3, input_len=5, output_len=4, shared_prefix_len=16),
                               Arrival("poisson", rate=100, seed=3), num_prompts=6)

    report = asyncio.run(_with_server(servicer, go))
    results = report.runs[0].results
    assert report.runs[0].summary(None)["completed"] == 6
    by_rid = {r.request_id: list(r.token_ids.ids) for r in servicer.requests}
    for session in {r.session_id for r in results}:
        turns = sorted((r for r in results if r.session_id == session), key=lambda r: r.turn)
        assert [t.turn for t in turns] == [0, 1, 2] and session.endswith(("-s0", "-s1"))
        for prev, cur in zip(turns, turns[1:]):
            # turn t+1 = turn t's prompt + the reply actually streamed + 5 new tokens
            assert by_rid[cur.request_id][: prev.input_tokens + 4] == by_rid[prev.request_id] + prev.reply_ids
            assert cur.input_tokens == prev.input_tokens + 4 + 5
    assert {r.session_id for r in servicer.requests} == {r.session_id for r in results}


def test_a_failed_turn_ends_its_session():
    servicer = FakeGeneration(fail=lambda i, r: grpc.StatusCode.UNAVAILABLE if i == 0 else None)

    async def go(target, _):
        return await arun_load(target, SessionWorkload(turns=4, input_len=3, output_len=2, shared_prefix_len=0),
                               Arrival("closed", concurrency=1), num_prompts=8)

    s = asyncio.run(_with_server(servicer, go)).runs[0].summary(None)
    assert (s["completed"], s["failed"], s["not_sent"]) == (4, 1, 3)


def test_sweep_runs_once_per_rate():
    async def go(target, _):
        return await arun_load(target, SyntheticWorkload(input_len=4, output_len=3), Arrival("gamma", burstiness=0.5),
                               rates=[100, 200], num_prompts=10)

    report = asyncio.run(_with_server(FakeGeneration(), go))
    assert [r.arrival.rate for r in report.runs] == [100, 200]
    assert [r.label for r in report.runs] == ["gamma 100/s b=0.5", "gamma 200/s b=0.5"]
    assert all(r.summary(None)["completed"] == 10 for r in report.runs)


def test_connections_are_bounded_and_all_used():
    servicer = FakeGeneration(ttft_s=0.005, itl_s=0.001)

    async def go(target, _):
        return await arun_load(target, SyntheticWorkload(input_len=4, output_len=2), Arrival("burst"),
                               num_prompts=30, connections=3)

    asyncio.run(_with_server(servicer, go))
    assert len(servicer.peers) == 3


def test_ctrl_c_keeps_a_partial_report():
    servicer = FakeGeneration(ttft_s=5.0)

    async def go(target, _):
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGINT)
        return await arun_load(target, SyntheticWorkload(input_len=4, output_len=2), Arrival("poisson", rate=50),
                               num_prompts=100, handle_sigint=True)

    run = asyncio.run(_with_server(servicer, go)).runs[0]
    s = run.summary(None)
    assert run.aborted.startswith("interrupted")
    assert s["errors"] == {"CANCELLED": s["sent"]} and 0 < s["sent"] < 100
    assert s["completed"] + s["failed"] + s["not_sent"] == 100


def test_trace_lengths_under_poisson_arrivals(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 1000 * i, "input_length": 5 + i, "output_length": 2}) + "\n"
                             for i in range(6)))

    async def go(target, _):
        return await arun_load(target, TraceWorkload(str(trace)), Arrival("poisson", rate=200, seed=0),
                               num_prompts=None)

    run = asyncio.run(_with_server(FakeGeneration(), go)).runs[0]
    assert run.label == "poisson 200/s" and run.duration_s < 2.0   # not the trace's 5 s
    assert sorted(r.input_tokens for r in run.results) == [5, 6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="trace workload"):
        asyncio.run(_with_server(FakeGeneration(), lambda t, _: arun_load(
            t, SyntheticWorkload(), Arrival("trace"), num_prompts=2)))
