"""The worker services in one process: real engines on the tiny checkpoint, the
in-process fake KV transfer, real gRPC servers on loopback, no router.

Covers what the end-to-end tests cannot steer precisely: page accounting of
the decode worker's queues (commitments, leases, cancel, checksum failure),
the prefill scheduler's token-budget batching and back-pressure.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from dsv32_proto import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow

DECODE_PAGES = 12


@pytest.fixture(scope="module")
def workers(tiny_model):
    from dsv32_decode.worker import DecodeService
    from dsv32_engine.engine import EngineCore
    from dsv32_engine.transfer.fake import FakeKVReceiver, FakeKVSender, FakeTransferHub
    from dsv32_prefill.scheduler import PrefillScheduler
    from dsv32_prefill.worker import PrefillService

    hub = FakeTransferHub()
    d_engine = EngineCore(tiny_model, num_pages=DECODE_PAGES)
    p_engine = EngineCore(tiny_model, num_pages=32, max_num_batched_tokens=128)
    receiver = FakeKVReceiver(d_engine.cache, worker_id="d0", timeout_s=5, hub=hub)
    sender = FakeKVSender(p_engine.cache, worker_id="p0", timeout_s=5, hub=hub)
    decode = DecodeService("d0", d_engine, receiver, transfer_timeout_s=5)
    decode.batch.start()
    sched = PrefillScheduler(p_engine, sender, budget_tokens=128, max_queued_tokens=300, transfer_timeout_s=5).start()
    prefill = PrefillService("p0", p_engine, sched, fault_injection=True)
    servers, stubs = [], []
    for svc, add, stub in ((decode, worker_pb2_grpc.add_DecodeWorkerServicer_to_server, worker_pb2_grpc.DecodeWorkerStub),
                           (prefill, worker_pb2_grpc.add_PrefillWorkerServicer_to_server, worker_pb2_grpc.PrefillWorkerStub)):
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        add(svc, srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        srv.start()
        servers.append(srv)
        stubs.append(stub(grpc.insecure_channel(f"127.0.0.1:{port}")))
    yield decode, prefill, stubs[0], stubs[1]
    for srv in servers:
        srv.stop(None)
    decode.batch.stop()
    sched.stop()


def _sampling(max_tokens=4):
    return worker_pb2.WorkerSampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=1)


def _run(d_stub, p_stub, rid, prompt, max_tokens=4):
    res = d_stub.Reserve(worker_pb2.ReserveRequest(request_id=rid, num_prompt_tokens=len(prompt),
                                                    max_tokens=max_tokens, prefill_worker_id="p0", lease_s=30))
    pre = p_stub.Prefill(worker_pb2.PrefillRequest(
        request_id=rid, prompt_ids=prompt, sampling=_sampling(max_tokens), decode_worker_id=res.decode_worker_id,
        transfer_endpoint=res.transfer_endpoint, transfer_id=res.transfer_id, dst_page_ids=res.page_ids))
    msgs = list(d_stub.Decode(worker_pb2.DecodeRequest(
        request_id=rid, transfer_id=res.transfer_id, prompt_ids=prompt, sampling=_sampling(max_tokens),
        first=pre.first, checksum=pre.checksum, sent_bytes=pre.sent_bytes)))
    return res, pre, msgs


def _pool_full(decode, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        a = decode.engine.allocator
        if a.num_free == a.num_total and decode.prealloc.committed_pages == 0 and decode.batch.running == 0:
            return True
        time.sleep(0.02)
    return False


def test_reserve_prefill_decode_round_trip(workers):
    decode, prefill, d_stub, p_stub = workers
    prompt = list(range(100, 230))  # 130 tokens: 3 pages, chunked at 128 on the prefill side
    res, pre, msgs = _run(d_stub, p_stub, "w-1", prompt)
    assert len(res.page_ids) == 3 and res.expected_bytes == pre.sent_bytes == msgs[0].received_bytes
    assert msgs[0].checksum == pre.checksum and msgs[0].tokens[0] == pre.first
    tokens = [t for m in msgs for t in m.tokens]
    assert len(tokens) == 4 and tokens[-1].finished and tokens[-1].finish_reason == "length"
    assert _pool_full(decode)
    prefill.engine.allocator.check_no_leaks()
    assert decode.stats().prefill_forward_tokens == 0 and prefill.stats().prefill_forward_tokens >= len(prompt)


def test_capacity_is_committed_for_prompt_plus_max_tokens(workers):
    decode, _, d_stub, _ = workers
    big = worker_pb2.ReserveRequest(request_id="w-big", num_prompt_tokens=64, max_tokens=64 * (DECODE_PAGES - 1) + 1,
                                    prefill_worker_id="p0", lease_s=30)
    with pytest.raises(grpc.RpcError) as e:
        d_stub.Reserve(big)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ok = d_stub.Reserve(worker_pb2.ReserveRequest(request_id="w-fits", num_prompt_tokens=64, max_tokens=64 * 10,
                                                  prefill_worker_id="p0", lease_s=30))
    assert len(ok.page_ids) == 1, "only the prompt's pages are taken now"
    assert decode.report()["free_pages"] == 1, "but the request's whole life is committed"
    with pytest.raises(grpc.RpcError) as e:
        d_stub.Reserve(worker_pb2.ReserveRequest(request_id="w-more", num_prompt_tokens=64, max_tokens=64,
                                                 prefill_worker_id="p0", lease_s=30))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert d_stub.Cancel(worker_pb2.CancelRequest(request_id="w-fits")).found
    assert _pool_full(decode)


def test_an_unclaimed_reservation_expires(workers):
    decode, _, d_stub, _ = workers
    res = d_stub.Reserve(worker_pb2.ReserveRequest(request_id="w-lease", num_prompt_tokens=10, max_tokens=5,
                                                   prefill_worker_id="p0", lease_s=0.05))
    time.sleep(0.1)
    assert decode.prealloc.expire() == ["w-lease"]
    assert _pool_full(decode)
    with pytest.raises(grpc.RpcError) as e:
        list(d_stub.Decode(worker_pb2.DecodeRequest(request_id="w-lease", transfer_id=res.transfer_id,
                                                    prompt_ids=[1] * 10, sampling=_sampling())))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_corrupted_transfer_is_data_loss_and_frees_the_pages(workers):
    decode, prefill, d_stub, p_stub = workers
    before = decode.stats().checksum_failures
    p_stub.InjectFault(worker_pb2.FaultRequest(kind="corrupt_index", count=1))
    with pytest.raises(grpc.RpcError) as e:
        _run(d_stub, p_stub, "w-bad", list(range(300, 370)))
    assert e.value.code() == grpc.StatusCode.DATA_LOSS and "checksum" in e.value.details()
    assert decode.stats().checksum_failures == before + 1
    assert _pool_full(decode)
    _run(d_stub, p_stub, "w-good", list(range(300, 370)))  # the fault was one-shot


def test_cancelling_the_stream_aborts_and_frees(workers):
    decode, _, d_stub, p_stub = workers
    prompt = list(range(500, 540))
    res = d_stub.Reserve(worker_pb2.ReserveRequest(request_id="w-cancel", num_prompt_tokens=len(prompt),
                                                   max_tokens=400, prefill_worker_id="p0", lease_s=30))
    pre = p_stub.Prefill(worker_pb2.PrefillRequest(
        request_id="w-cancel", prompt_ids=prompt, sampling=_sampling(400), decode_worker_id="d0",
        transfer_endpoint=res.transfer_endpoint, transfer_id=res.transfer_id))
    call = d_stub.Decode(worker_pb2.DecodeRequest(
        request_id="w-cancel", transfer_id=res.transfer_id, prompt_ids=prompt, sampling=_sampling(400),
        first=pre.first, checksum=pre.checksum, sent_bytes=pre.sent_bytes))
    next(call)
    next(call)
    call.cancel()
    assert _pool_full(decode)
    assert decode.stats().requests_aborted >= 1


def test_prefill_batches_under_the_token_budget(workers):
    decode, prefill, d_stub, p_stub = workers
    out: dict[str, worker_pb2.PrefillResponse] = {}

    def one(i, n):
        out[f"b{i}"] = _run(d_stub, p_stub, f"w-batch-{i}", list(range(1000 + i, 1000 + i + n)), max_tokens=2)[1]

    # hold the loop on a long prompt so that the next ones queue up together
    threads = [threading.Thread(target=one, args=(0, 250))]
    threads[0].start()
    time.sleep(0.05)
    threads += [threading.Thread(target=one, args=(i, 40)) for i in range(1, 4)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    assert max(out[f"b{i}"].batch_size for i in range(1, 4)) >= 2, "short prompts share a batch"
    assert all(out[f"b{i}"].batch_size <= 3 for i in range(1, 4)), "3 x 40 tokens fit the 128-token budget"
    assert _pool_full(decode)


def test_prefill_back_pressure_and_cancel_in_queue(workers):
    from dsv32_prefill.scheduler import PrefillJob, PrefillScheduler, QueueFull

    _, prefill, _, _ = workers
    sched = PrefillScheduler(prefill.engine, None, budget_tokens=128, max_queued_tokens=300, transfer_timeout_s=1)
    jobs = [PrefillJob(f"q{i}", [1] * 200, None, "t", "e", "d") for i in range(3)]
    sched.submit(jobs[0])  # never started: jobs stay queued
    with pytest.raises(QueueFull, match="queued"):
        sched.submit(jobs[1])
    sched.cancel(jobs[0])
    assert jobs[0].done.is_set() and jobs[0].error == "cancelled" and sched.queued_tokens == 0
    sched.submit(jobs[2])  # room again
    assert sched.num_waiting == 1
