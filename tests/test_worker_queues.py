"""The workers' transfer-side queues with fake transfer ends whose state the test moves by hand:
the prefill worker's inflight queue (the batch loop goes on while a transfer ends) and the decode
worker's transfer queue (verify, then admit; or say why not)."""

from __future__ import annotations

import queue
import time
from types import SimpleNamespace

import pytest

from dsv32_engine.cache import PageAllocator
from dsv32_engine.transfer import ChecksumMismatch, KVPoll, PeerFailed, TransferResult
from dsv32_engine.transfer.state import TransferState


def _until(cond, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _result(tid: str, nbytes: int = 100, checksum: str = "kv1:ok") -> TransferResult:
    return TransferResult(tid, nbytes, checksum, 0.01)


# -- prefill: the batch loop hands transfers to the inflight queue -------------------------------------

class FakeSender:
    """Transfers that end only when the test says so."""

    def __init__(self):
        self.handles: dict[str, SimpleNamespace] = {}

    def begin(self, transfer_id, endpoint, decode_id, src_pages, token=""):
        h = SimpleNamespace(transfer_id=transfer_id, status=TransferState(transfer_id))
        self.handles[transfer_id] = h
        return h

    def send_layer(self, handle, layer):
        handle.status.advance(KVPoll.TRANSFERRING)

    def finish(self, handle, timeout_s):
        return handle.status.wait(timeout_s)

    def poll(self, handle):
        return handle.status.state


class FakeEngine:
    """Two layers, no expert-parallel group; records which prompts ran (a forward is instant)."""

    ep = None
    prefix = None  # no prefix cache

    def __init__(self, num_pages: int):
        self.layout = SimpleNamespace(pages_for=lambda n: -(-n // 64), page_size=64)
        self.allocator = PageAllocator(num_pages)
        self.ran: list[str] = []

    def match_prefix(self, prompt_ids, params=None, acquire=True):
        return []

    def prefill(self, inputs, on_layer_done):
        for layer in range(2):
            on_layer_done(layer)
        self.ran += [i.request_id for i in inputs]
        return [SimpleNamespace(request_id=i.request_id, token_id=7, finished=False) for i in inputs]


def _scheduler(num_pages: int, timeout_s: float = 5.0):
    from dsv32_prefill.scheduler import PrefillScheduler

    engine, sender = FakeEngine(num_pages), FakeSender()
    sched = PrefillScheduler(engine, sender, budget_tokens=64, max_queued_tokens=10_000, transfer_timeout_s=timeout_s)
    return engine, sender, sched.start()


def _job(rid: str, tokens: int = 64):
    from dsv32_prefill.scheduler import PrefillJob

    return PrefillJob(rid, [1] * tokens, None, f"t-{rid}", "e", "d0")


def test_the_next_batch_runs_while_the_last_one_is_still_sending():
    engine, sender, sched = _scheduler(num_pages=8)
    try:
        a, b = _job("a"), _job("b")
        sched.submit(a)
        assert _until(lambda: len(sched.inflight) == 1)
        sched.submit(b)
        assert _until(lambda: engine.ran == ["a", "b"]), "b's forward does not wait for a's transfer"
        assert not a.done.is_set() and engine.allocator.num_free == 6, "a and b hold their pages while sending"
        sender.handles["t-b"].status.succeed(_result("t-b"))
        assert b.done.wait(2) and b.error is None and b.transfer.num_bytes == 100
        assert not a.done.is_set(), "each transfer answers its own RPC"
        sender.handles["t-a"].status.succeed(_result("t-a"))
        assert a.done.wait(2) and a.error is None
        assert _until(lambda: engine.allocator.num_free == 8)
        assert sched.counters["requests"] == 2 and sched.counters["bytes_sent"] == 200
    finally:
        sched.stop()


def test_a_prompt_waits_for_pages_held_by_a_transfer_in_flight():
    engine, sender, sched = _scheduler(num_pages=2)
    try:
        a, b = _job("a", 128), _job("b", 64)
        sched.submit(a)
        assert _until(lambda: len(sched.inflight) == 1)
        sched.submit(b)
        time.sleep(0.1)
        assert engine.ran == ["a", "a"] and b.error is None, "b waits instead of failing for want of pages"
        sender.handles["t-a"].status.succeed(_result("t-a"))
        assert _until(lambda: engine.ran == ["a", "a", "b"])  # a: two chunks of the 64-token budget
        sender.handles["t-b"].status.succeed(_result("t-b"))
        assert a.done.wait(2) and b.done.wait(2) and a.error is None and b.error is None
    finally:
        sched.stop()


@pytest.mark.parametrize("how", ["failed", "timeout"])
def test_a_transfer_that_fails_or_runs_late_fails_its_request_and_frees_its_pages(how):
    engine, sender, sched = _scheduler(num_pages=4, timeout_s=0.2 if how == "timeout" else 5.0)
    try:
        job = _job("x")
        sched.submit(job)
        assert _until(lambda: len(sched.inflight) == 1)
        if how == "failed":
            sender.handles["t-x"].status.fail(PeerFailed("connection closed"))
        assert job.done.wait(3)
        assert "KV transfer to d0 failed" in job.error and ("connection closed" if how == "failed" else "still") in job.error
        assert _until(lambda: engine.allocator.num_free == 4) and sched.counters["failed"] == 1
    finally:
        sched.stop()


# -- decode: the transfer queue verifies, then admits -----------------------------------------------------

class FakeReceiver:
    def __init__(self):
        self.status: dict[str, TransferState] = {}
        self.released: list[str] = []

    def expect(self, tid):
        self.status[tid] = TransferState(tid)

    def poll(self, tid):
        return self.status[tid].state

    def wait(self, tid, timeout_s):
        return self.status[tid].wait(timeout_s)

    def release(self, tid):
        self.status.pop(tid, None)
        self.released.append(tid)


@pytest.fixture
def transfers():
    from dsv32_decode.queues import Admission
    from dsv32_decode.transfer_queue import DecodeTransferQueue, Incoming

    receiver, admitted, dropped = FakeReceiver(), [], []
    batch = SimpleNamespace(admit=admitted.append)
    q = DecodeTransferQueue(receiver, batch, drop=dropped.append)

    def incoming(rid: str, checksum: str = "kv1:ok", timeout_s: float = 5.0) -> Admission:
        receiver.expect(f"t-{rid}")
        adm = Admission(rid, [1, 2], None, [0], first=None)
        q.add(Incoming(adm, f"t-{rid}", checksum, 100, deadline=time.monotonic() + timeout_s))
        return adm

    yield SimpleNamespace(q=q, receiver=receiver, admitted=admitted, dropped=dropped, incoming=incoming)
    q.stop()


def test_a_verified_transfer_joins_the_running_batch(transfers):
    from dsv32_decode.transfer_queue import Verified

    adm = transfers.incoming("r1")
    time.sleep(0.05)
    assert transfers.admitted == [] and len(transfers.q) == 1
    transfers.receiver.status["t-r1"].succeed(_result("t-r1"))
    first = adm.out.get(timeout=2)
    assert isinstance(first, Verified) and first.received.checksum == "kv1:ok"
    assert transfers.admitted == [adm] and transfers.dropped == [] and "t-r1" in transfers.receiver.released
    assert transfers.q.counters == {"bytes_received": 100, "checksum_failures": 0}


@pytest.mark.parametrize("case", ["checksum-on-the-wire", "other-than-reported", "peer-failed", "late"])
def test_a_transfer_that_is_not_what_was_sent_or_not_here_in_time_frees_the_reservation(transfers, case):
    from dsv32_decode.transfer_queue import KVFailed, KVRejected

    adm = transfers.incoming("r2", checksum="kv1:other" if case == "other-than-reported" else "kv1:ok",
                             timeout_s=0.1 if case == "late" else 5.0)
    status = transfers.receiver.status["t-r2"]
    if case == "checksum-on-the-wire":
        status.fail(ChecksumMismatch("checksum mismatch: sender a, receiver b"))
    elif case == "peer-failed":
        status.fail(PeerFailed("connection closed"))
    elif case == "other-than-reported":
        status.succeed(_result("t-r2"))
    error = adm.out.get(timeout=2)
    rejected = case in ("checksum-on-the-wire", "other-than-reported")
    assert isinstance(error, KVRejected if rejected else KVFailed), error
    assert transfers.admitted == [] and transfers.dropped == ["r2"]
    assert transfers.q.counters["checksum_failures"] == (1 if rejected else 0)


def test_a_stream_that_leaves_first_takes_its_request_back(transfers):
    adm = transfers.incoming("r3")
    assert transfers.q.discard("r3") and not transfers.q.discard("r3")
    transfers.receiver.status["t-r3"].succeed(_result("t-r3"))
    time.sleep(0.05)
    assert transfers.admitted == [] and transfers.dropped == []
    with pytest.raises(queue.Empty):
        adm.out.get_nowait()

