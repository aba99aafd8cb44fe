"""Issue 10 (a): no single message breaks a worker.

The worker services in one process (real engines on the tiny checkpoint, the
in-process fake KV transfer, real gRPC servers on loopback; the fixture of
``test_router_workers``), sent what a confused or hostile peer would send:
cancels in every state and twice, leases of 1e9 s, reservations with nonsense,
prefills aimed at an address no decode worker registered. And the real KV
receiver: garbage pushed into its TCPStore queue, the address it listens on.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from dsv32_proto import worker_pb2
from test_router_workers import _pool_full, _run, _sampling, workers  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(120)


def _reserve(d_stub, rid, n=70, max_tokens=8, lease_s=30.0):
    return d_stub.Reserve(worker_pb2.ReserveRequest(request_id=rid, num_prompt_tokens=n, max_tokens=max_tokens,
                                                    prefill_worker_id="p0", lease_s=lease_s))


def _loop_alive(decode) -> bool:
    return decode.batch.error is None and decode.batch._thread.is_alive() and not decode.healthy()


def test_cancel_of_a_running_request_twice_frees_each_page_once(workers):
    decode, prefill, d_stub, p_stub = workers
    prompt = list(range(400, 470))
    res = _reserve(d_stub, "h-run#1", len(prompt), max_tokens=600)
    sampling = worker_pb2.WorkerSampling(temperature=0.0, top_p=1.0, max_tokens=600, seed=1, ignore_eos=True)
    pre = p_stub.Prefill(worker_pb2.PrefillRequest(
        request_id="h-run#1", prompt_ids=prompt, sampling=sampling, decode_worker_id=res.decode_worker_id,
        transfer_endpoint=res.transfer_endpoint, transfer_id=res.transfer_id, dst_page_ids=res.page_ids))
    stream = d_stub.Decode(worker_pb2.DecodeRequest(request_id="h-run#1", transfer_id=res.transfer_id,
                                                    prompt_ids=prompt, sampling=sampling, first=pre.first,
                                                    checksum=pre.checksum, sent_bytes=pre.sent_bytes))
    got = 0
    with pytest.raises(grpc.RpcError) as e:
        for msg in stream:
            got += len(msg.tokens)
            if got == 3:  # running: the engine owns its pages now
                assert decode.batch.running == 1
                assert d_stub.Cancel(worker_pb2.CancelRequest(request_id="h-run#1")).found
                d_stub.Cancel(worker_pb2.CancelRequest(request_id="h-run#1"))
                d_stub.Cancel(worker_pb2.CancelRequest(request_id="never-seen"))
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert _pool_full(decode) and _loop_alive(decode)
    decode.engine.allocator.check_no_leaks()
    _run(d_stub, p_stub, "h-after", list(range(500, 540)))  # the worker still serves
    assert _pool_full(decode)


def test_cancel_of_a_reservation_frees_its_pages_at_once_and_is_idempotent(workers):
    decode, _, d_stub, _ = workers
    _reserve(d_stub, "h-res")
    assert decode.free_pages() < decode.engine.allocator.num_total
    assert d_stub.Cancel(worker_pb2.CancelRequest(request_id="h-res")).found
    assert _pool_full(decode, timeout=0.05), "freed by the Cancel itself, not by the lease"
    assert not d_stub.Cancel(worker_pb2.CancelRequest(request_id="h-res")).found
    assert _pool_full(decode) and _loop_alive(decode)


def test_cancel_while_the_kv_is_arriving_ends_the_stream_and_frees_once(workers):
    decode, _, d_stub, _ = workers
    res = _reserve(d_stub, "h-kv", n=40)
    stream = d_stub.Decode(worker_pb2.DecodeRequest(  # no prefill: its KV never comes
        request_id="h-kv", transfer_id=res.transfer_id, prompt_ids=[5] * 40, sampling=_sampling(),
        first=worker_pb2.Token(token_id=7), checksum="kv1:0", sent_bytes=1))
    out = []
    t = threading.Thread(target=lambda: out.append(_code(lambda: list(stream))))
    t.start()
    deadline = time.monotonic() + 5
    while not len(decode.transfers) and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(2):
        d_stub.Cancel(worker_pb2.CancelRequest(request_id="h-kv"))
    t.join(5)
    assert out == [grpc.StatusCode.UNAVAILABLE]
    assert _pool_full(decode) and _loop_alive(decode)


def _code(f):
    try:
        f()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_a_lease_of_1e9_seconds_is_capped(workers):
    decode, _, d_stub, _ = workers
    saved = decode.max_lease_s
    decode.max_lease_s = 0.2
    try:
        for rid, lease in (("h-huge", 1e9), ("h-nan", float("nan")), ("h-neg", -5.0)):
            _reserve(d_stub, rid, lease_s=lease)
        time.sleep(0.3)
        assert sorted(decode.prealloc.expire()) == ["h-huge", "h-nan", "h-neg"]
    finally:
        decode.max_lease_s = saved
    assert _pool_full(decode)


@pytest.mark.parametrize("bad", [dict(num_prompt_tokens=0), dict(max_tokens=(1 << 32) - 1),
                                 dict(num_prompt_tokens=(1 << 32) - 1), dict(request_id=""),
                                 dict(request_id="x" * 300), dict(prefill_worker_id="")], ids=str)
def test_a_nonsense_reservation_is_invalid_argument(workers, bad):
    decode, _, d_stub, _ = workers
    req = dict(request_id="h-bad", num_prompt_tokens=10, max_tokens=4, prefill_worker_id="p0", lease_s=1)
    req.update(bad)
    with pytest.raises(grpc.RpcError) as e:
        d_stub.Reserve(worker_pb2.ReserveRequest(**req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _pool_full(decode)


class _Registry:
    def __init__(self, workers):
        self._workers = workers

    def workers(self, role=None):
        return self._workers


def test_prefill_sends_kv_only_to_a_registered_decode_workers_endpoint(workers):
    from dsv32_cluster.state import WorkerInfo
    from dsv32_prefill.worker import DecodeTargets

    decode, prefill, d_stub, p_stub = workers
    d0 = WorkerInfo("d0", "decode", "127.0.0.1:1", transfer_endpoint=decode.transfer_endpoint)
    prefill.decode_targets = DecodeTargets(_Registry([d0]))
    try:
        for decode_id, endpoint in (("d0", "10.255.255.1:29500"), ("evil", "10.255.255.1:29500"),
                                    ("evil", decode.transfer_endpoint)):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                p_stub.Prefill(worker_pb2.PrefillRequest(
                    request_id="h-dial", prompt_ids=[1, 2, 3], sampling=_sampling(), decode_worker_id=decode_id,
                    transfer_endpoint=endpoint, transfer_id="t-h-dial", dst_page_ids=[0]))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "transfer_endpoint" in e.value.details()
            assert time.monotonic() - t0 < 1.0, "refused before any dial"
        _run(d_stub, p_stub, "h-registered", list(range(600, 640)))  # the registered one works
    finally:
        prefill.decode_targets = None
    prefill.engine.allocator.check_no_leaks()


# -- the real KV receiver --------------------------------------------------------------------------------

def _listening_addresses(port: int) -> set[str]:
    found = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(path).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                found.add(addr)
    return found


def test_the_kv_store_listens_on_the_configured_host_only():
    from dsv32_engine.transfer import KVReceiver
    from test_transfer import make_cache

    rx = KVReceiver(make_cache("fp8", 2, 4, seed=None), "127.0.0.1", 0, "decode-0", timeout_s=5)
    try:
        assert _listening_addresses(rx.port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 / ::
    finally:
        rx.close()


def test_garbage_in_the_announcement_queue_leaves_the_receiver_working():
    from datetime import timedelta

    import torch.distributed as dist

    from dsv32_engine.transfer import KVReceiver, KVSender
    from dsv32_engine.transfer.pair import ANNOUNCE_QUEUE
    from test_transfer import assert_landed, make_cache

    src, dst = make_cache("fp8", 2, 4, seed=3), make_cache("fp8", 2, 4, seed=None)
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=10)
    tx = KVSender(src, "prefill-0", timeout_s=10)
    try:
        attacker = dist.TCPStore("127.0.0.1", rx.port, None, False, timedelta(seconds=5), wait_for_workers=False)
        for junk in ["not json", "[1]", "{}", '{"transfer_id": 1}', "\xff" * 10, "x" * 100_000,
                     '{"transfer_id": "t", "prefill_id": "p", "gen": -1, "seq": 0, "num_layers": 2, "num_pages": 1,'
                     ' "latent_page_bytes": 1, "index_page_bytes": 1, "backend": "gloo", "ordered": false,'
                     ' "chunk_pages": 1}']:
            attacker.queue_push(ANNOUNCE_QUEUE, junk)
        deadline = time.monotonic() + 5
        while rx._bootstrap.rejected < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rx._bootstrap.rejected == 7 and rx.healthy
        rx.expect("after-junk", "prefill-0", [2])
        h = tx.begin("after-junk", rx.endpoint, rx.worker_id, [1])
        for layer in range(h.num_layers):
            tx.send_layer(h, layer)
        tx.finish(h, 10)
        rx.wait("after-junk", 10)
        assert_landed(src, [1], dst, [2])
    finally:
        tx.close()
        rx.close()


# -- bad input (finding 10, the temperature part) ----------------------------------------------------------

@pytest.mark.parametrize("t", [1e-45, 1e-30, 9e-6])
def test_a_temperature_below_the_epsilon_is_greedy(tiny_model, t):
    from dsv32_engine import SamplingParams

    llm = _llm(tiny_model)
    prompt = list(range(700, 730))
    [greedy] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    [tiny] = llm.generate([prompt], SamplingParams(temperature=t, max_tokens=8, ignore_eos=True, seed=3))
    assert tiny.outputs[0].token_ids == greedy.outputs[0].token_ids
    assert len(set(greedy.outputs[0].token_ids)) > 1, "not token 0 repeated"


_LLMS = {}


def _llm(model):
    from dsv32_engine import LLM

    if model not in _LLMS:
        _LLMS[model] = LLM(model=model)
    return _LLMS[model]


def test_the_kv_handshake_needs_the_token_the_decode_worker_issued():
    from dsv32_engine.transfer import KVReceiver, KVSender, TransferError
    from test_transfer import assert_landed, make_cache

    src, dst = make_cache("fp8", 2, 4, seed=5), make_cache("fp8", 2, 4, seed=None)
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=5, require_auth=True)
    tx = KVSender(src, "prefill-0", timeout_s=5)
    try:
        with pytest.raises(ValueError):
            rx.expect("no-token", "prefill-0", [0])
        rx.expect("forged", "prefill-0", [0], token="a" * 32)
        h = tx.begin("forged", rx.endpoint, rx.worker_id, [1], token="b" * 32)  # a sender without the token
        for layer in range(h.num_layers):
            tx.send_layer(h, layer)
        with pytest.raises(TransferError) as e:
            rx.wait("forged", 10)
        assert "not authenticated" in str(e.value)
        rx.release("forged")
        try:
            tx.finish(h, 10)
        except TransferError:
            pass
        rx.expect("genuine", "prefill-0", [2], token="c" * 32)
        h = tx.begin("genuine", rx.endpoint, rx.worker_id, [1], token="c" * 32)
        for layer in range(h.num_layers):
            tx.send_layer(h, layer)
        tx.finish(h, 10)
        rx.wait("genuine", 10)
        assert_landed(src, [1], dst, [2])
    finally:
        tx.close()
        rx.close()


# -- finding 3: a prompt queued on the prefill worker longer than a lease -------------------------------

def test_a_renewed_reservation_outlives_its_lease_and_the_cap_still_holds(workers):
    decode, _, d_stub, _ = workers
    saved = decode.max_lease_s
    decode.max_lease_s = 0.3
    try:
        _reserve(d_stub, "h-renew", lease_s=0.3)
        for _ in range(6):  # 0.9 s: three leases
            time.sleep(0.15)
            d_stub.Reserve(worker_pb2.ReserveRequest(request_id="h-renew", lease_s=1e9, renew=True))
            assert decode.prealloc.expire() == []
        time.sleep(0.35)  # renewals stop (the router's call ended): the lease runs out, capped at 0.3 s
        assert decode.prealloc.expire() == ["h-renew"]
        with pytest.raises(grpc.RpcError) as e:
            d_stub.Reserve(worker_pb2.ReserveRequest(request_id="h-renew", lease_s=1, renew=True))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        decode.max_lease_s = saved
    assert _pool_full(decode)


def test_an_announcement_after_the_transfer_timeout_but_within_the_hold_is_received():
    from dsv32_engine.transfer import KVReceiver, KVSender
    from test_transfer import assert_landed, make_cache

    src, dst = make_cache("fp8", 2, 4, seed=9), make_cache("fp8", 2, 4, seed=None)
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=0.5, announce_timeout_s=10)
    tx = KVSender(src, "prefill-0", timeout_s=5)
    try:
        rx.expect("late", "prefill-0", [3])
        time.sleep(1.2)  # the prompt waited in the prefill worker's queue longer than the transfer timeout
        h = tx.begin("late", rx.endpoint, rx.worker_id, [0])
        for layer in range(h.num_layers):
            tx.send_layer(h, layer)
        tx.finish(h, 10)
        rx.wait("late", 10)
        assert_landed(src, [0], dst, [3])
    finally:
        tx.close()
        rx.close()
