"""End to end, issue 10: one message must not break a worker, and a hung worker's streams move on.

Real processes (router, a prefill worker, two decode workers, started role by role as a deployment
would) around the session's redis-server, on the tiny checkpoint:

* finding 1: ``Cancel`` of a running request on the decode worker's internal API (its id,
  ``<request_id>#1``, is predictable), sent twice: the worker keeps serving, every page comes back;
* finding 2: garbage pushed into a decode worker's KV TCPStore: the next requests are served and the
  worker stays SERVING; the store listens on the configured host only;
* finding 4: a ``Prefill`` aimed at an address no decode worker registered is refused before any dial;
* finding 5: a decode worker stopped with SIGSTOP mid-stream: the stream completes on the other decode
  worker with the offline tokens, none repeated, within the registry TTL + a few seconds.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import grpc
import pytest

from dsv32_proto import worker_pb2, worker_pb2_grpc
from dsv32_router.client import generate, stream_responses
from roles import roles as start_roles
from roles import serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = list(range(3000, 3060))
MAX_TOKENS = 80


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server, tmp_path_factory):
    def oracle():
        from dsv32_engine import LLM, SamplingParams

        [out] = LLM(model=tiny_model).generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                                         ignore_eos=True))
        return out.outputs[0].token_ids

    specs = [("prefill", ["--worker-id", "ho-p0"]), ("decode", ["--worker-id", "ho-d0"]),
             ("decode", ["--worker-id", "ho-d1"])]
    with start_roles(tiny_model, redis_server, 5, "ho:", tmp_path_factory.mktemp("hostile-logs"), specs, 3,
                     before_ready=oracle) as c:
        yield c


def _decode_workers(state):
    return {w.worker_id: w for w in state.workers("decode")}


def _pools_full(state, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws = state.workers()
        if len(ws) == 3 and all(w.free_pages == w.total_pages and not w.running and not w.reserved_pages
                                for w in ws):
            return True
        time.sleep(0.2)
    return False


def _stream(target, rid, on_token=None):
    tokens, decode_worker = [], None
    for msg in stream_responses(target, PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                request_id=rid, timeout=120):
        decode_worker = decode_worker or msg.decode_worker
        tokens += msg.token_ids
        if on_token is not None:
            on_token(tokens, decode_worker)
    return tokens


def test_internal_cancel_of_a_running_request_twice_leaves_the_worker_serving(cluster):
    target, state, expected = cluster
    sent = []

    def cancel_twice(tokens, decode_worker):
        if len(tokens) >= 5 and not sent:
            w = _decode_workers(state)[decode_worker]
            with grpc.insecure_channel(w.endpoint) as ch:
                stub = worker_pb2_grpc.DecodeWorkerStub(ch)
                for _ in range(2):
                    sent.append(stub.Cancel(worker_pb2.CancelRequest(request_id="hostile-cancel#1"), timeout=5))

    tokens = _stream(target, "hostile-cancel", cancel_twice)
    assert sent and sent[0].found
    assert tokens == expected, "aborted on one worker, retried on the other: nothing lost or repeated"
    assert _pools_full(state)
    for w in _decode_workers(state).values():
        assert serving(w.endpoint), f"{w.worker_id} must survive a cancel of a running request"
    assert generate(target, PROMPT[:20], max_tokens=4, timeout=60).finish_reason


def test_garbage_in_the_kv_store_does_not_break_the_receiver(cluster):
    import torch.distributed as dist

    from dsv32_engine.transfer.pair import ANNOUNCE_QUEUE, parse_endpoint

    target, state, expected = cluster
    for w in _decode_workers(state).values():
        host, port = parse_endpoint(w.transfer_endpoint)
        assert host == "127.0.0.1"
        store = dist.TCPStore(host, port, None, False, timedelta(seconds=5), wait_for_workers=False)
        for junk in ["garbage", "[1]", "{}", '{"transfer_id": null}', "x" * 50_000]:
            store.queue_push(ANNOUNCE_QUEUE, junk)
    time.sleep(0.5)
    for i in range(3):  # whichever decode worker is chosen, it still receives KV
        assert len(generate(target, PROMPT[i:i + 30], max_tokens=4, timeout=60).token_ids) == 4
    for w in _decode_workers(state).values():
        assert serving(w.endpoint)
    assert _pools_full(state)


def test_prefill_refuses_a_transfer_endpoint_no_decode_worker_registered(cluster):
    _, state, _ = cluster
    p = state.workers("prefill")[0]
    d = next(iter(_decode_workers(state).values()))
    with grpc.insecure_channel(p.endpoint) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        for decode_id, endpoint in ((d.worker_id, "10.255.255.1:29500"), ("nobody", d.transfer_endpoint)):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                stub.Prefill(worker_pb2.PrefillRequest(
                    request_id="hostile-dial", prompt_ids=[1, 2, 3], decode_worker_id=decode_id,
                    transfer_endpoint=endpoint, transfer_id="t-dial", dst_page_ids=[0],
                    sampling=worker_pb2.WorkerSampling(max_tokens=1)), timeout=10)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert time.monotonic() - t0 < 1.0


def test_a_stopped_decode_workers_stream_fails_over_by_progress(cluster):
    target, state, expected = cluster
    stopped, t_stop = [], []

    def stop_it(tokens, decode_worker):
        if len(tokens) >= 5 and not stopped:
            w = _decode_workers(state)[decode_worker]
            os.kill(w.pid, signal.SIGSTOP)
            stopped.append(w)
            t_stop.append(time.monotonic())

    try:
        tokens = _stream(target, "hostile-stop", stop_it)
        took = time.monotonic() - t_stop[0]
    finally:
        for w in stopped:
            os.kill(w.pid, signal.SIGCONT)
    assert tokens == expected, "a retry must neither repeat nor lose tokens"
    assert took < 20, f"failed over {took:.1f}s after the stop (registry TTL 5 s + detection)"
    rec = state.request("hostile-stop")
    assert rec["state"] == "finished" and int(rec["attempts"]) == 2 and stopped[0].worker_id in rec["error"]
    deadline = time.monotonic() + 15  # resumed: it re-registers and its pages come back
    while len(state.workers()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pools_full(state)


def _worker_idle(w, within: float) -> float | None:
    """Seconds until worker ``w`` (its own Stats, no heartbeat lag) holds nothing; None if not ``within``."""
    t0 = time.monotonic()
    with grpc.insecure_channel(w.endpoint) as ch:
        stub = worker_pb2_grpc.DecodeWorkerStub(ch)
        while time.monotonic() - t0 < within:
            s = stub.Stats(worker_pb2.StatsRequest(), timeout=2)
            if s.free_pages == s.total_pages and not s.running_requests and not s.reserved_pages:
                return time.monotonic() - t0
            time.sleep(0.02)
    return None


def test_a_client_cancel_mid_stream_frees_the_decode_worker_within_1s(cluster):
    target, state, _ = cluster
    it = stream_responses(target, PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                          request_id="hostile-abort", timeout=120)
    got, worker = 0, None
    for msg in it:
        worker = worker or msg.decode_worker
        got += len(msg.token_ids)
        if got >= 3:
            break
    it.close()  # the client goes away
    took = _worker_idle(_decode_workers(state)[worker], within=1.0)
    assert took is not None, "the abort must reach the decode worker and free its pages within 1 s"


def test_a_client_cancel_during_prefill_frees_the_reservation_within_1s(cluster):
    from concurrent.futures import ThreadPoolExecutor

    target, state, _ = cluster
    long_prompt = [(7 * i) % 50_000 + 100 for i in range(1500)]
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(generate, target, long_prompt, max_tokens=4, timeout=0.6)  # the deadline cancels it
        t_end = None
        try:
            fut.result()
        except Exception:
            t_end = time.monotonic()
    assert t_end is not None, "the prompt must still be prefilling when the deadline hits"
    for w in _decode_workers(state).values():
        assert _worker_idle(w, within=1.0) is not None, f"{w.worker_id} still holds the reservation"
