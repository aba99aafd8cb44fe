"""One set of scenarios for every KV transfer backend, driven only through the protocols of ``transfer.base``.

``real``: ``KVSender``/``KVReceiver`` with both roles in this process (a real gloo pair group over
loopback, threads); ``fake``: the in-process copies. fp8 DeepSeek-V3.2 pages, latent and indexer.
"""

from __future__ import annotations

import inspect
import time

import pytest

from dsv32_engine.transfer import (ChecksumMismatch, GeometryMismatch, KVPoll, KVReceiver, KVReceiverProtocol,
                                   KVSender, KVSenderProtocol, StillInFlight, TransferTimeout, cache_checksum)
from dsv32_engine.transfer.fake import FakeKVReceiver, FakeKVSender, FakeTransferHub
from test_transfer import assert_landed, assert_zero_except, make_cache

pytestmark = pytest.mark.timeout(60)

LAYERS, PAGES = 3, 8


@pytest.fixture(params=["real", "fake"])
def make_pair(request):
    """``make_pair(timeout_s)`` → (source cache, destination cache, sender, receiver); all closed after the test."""
    hub, opened = FakeTransferHub(), []

    def make(timeout_s: float = 10.0) -> tuple:
        src, dst = make_cache("fp8", LAYERS, PAGES, seed=7), make_cache("fp8", LAYERS, PAGES, seed=None)
        if request.param == "real":
            tx = KVSender(src, "prefill-0", timeout_s=timeout_s)
            rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=timeout_s)
        else:
            tx = FakeKVSender(src, "prefill-0", timeout_s=timeout_s, hub=hub)
            rx = FakeKVReceiver(dst, worker_id="decode-0", timeout_s=timeout_s, hub=hub)
        opened.extend([tx, rx])
        return src, dst, tx, rx

    yield make
    for endpoint in opened:
        endpoint.close()


def send_all(tx: KVSenderProtocol, tid: str, rx: KVReceiverProtocol, src_pages: list[int]):
    h = tx.begin(tid, rx.endpoint, rx.worker_id, src_pages)
    for layer in range(h.num_layers):
        tx.send_layer(h, layer)
    return h


def poll_until(poll, state: KVPoll, seen: list[KVPoll], timeout_s: float = 10.0) -> None:
    """Poll until ``state`` or later (or FAILED), recording every answer in ``seen``."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen.append(poll())
        if seen[-1] >= state or seen[-1] == KVPoll.FAILED or time.monotonic() > deadline:
            return
        time.sleep(0.002)


def assert_implements(obj, protocol) -> None:
    """``isinstance`` on a protocol checks names only: also check every method takes the protocol's parameters."""
    assert isinstance(obj, protocol)
    for name, member in vars(protocol).items():
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        want = list(inspect.signature(member).parameters.values())[1:]  # without self
        have = list(inspect.signature(getattr(obj, name)).parameters.values())
        where = f"{type(obj).__name__}.{name}"
        assert [p.name for p in have[: len(want)]] == [p.name for p in want], where
        assert all(q.default is not q.empty for p, q in zip(want, have) if p.default is not p.empty), where
        assert all(q.default is not q.empty for q in have[len(want):]), where


def test_both_roles_implement_the_protocols(make_pair):
    _, _, tx, rx = make_pair()
    assert_implements(tx, KVSenderProtocol)
    assert_implements(rx, KVReceiverProtocol)


def test_latent_and_indexer_pages_land_identical_and_polls_move_forward(make_pair):
    src, dst, tx, rx = make_pair()
    assert src.layout.index_page_bytes and src.index[0].shape[0]  # the indexer pages travel too
    src_pages, dst_pages = [5, 0, 3], [1, 6, 2]
    rx_seen, tx_seen = [], []
    rx.expect("t", "prefill-0", dst_pages)
    rx_seen.append(rx.poll("t"))
    h = tx.begin("t", rx.endpoint, "decode-0", src_pages)
    tx_seen.append(tx.poll(h))
    tx.send_layer(h, 0)
    # Layers 1.. are held back: both sides must be TRANSFERRING, and neither can be done.
    poll_until(lambda: rx.poll("t"), KVPoll.TRANSFERRING, rx_seen)
    poll_until(lambda: tx.poll(h), KVPoll.TRANSFERRING, tx_seen)
    assert rx_seen[-1] == tx_seen[-1] == KVPoll.TRANSFERRING
    for layer in range(1, LAYERS):
        tx.send_layer(h, layer)
    sent, got = tx.finish(h, 10), rx.wait("t", 10)
    rx_seen.append(rx.poll("t"))
    tx_seen.append(tx.poll(h))
    for seen in (rx_seen, tx_seen):
        assert seen[0] in (KVPoll.BOOTSTRAPPING, KVPoll.WAITING) and seen[-1] == KVPoll.SUCCESS
        assert seen == sorted(seen) and KVPoll.FAILED not in seen  # only ever forward
    page_bytes = src.layout.latent_page_bytes + src.layout.index_page_bytes
    assert sent.num_bytes == got.num_bytes == len(src_pages) * page_bytes * LAYERS
    assert sent.checksum == got.checksum == cache_checksum(src, src_pages)
    assert_landed(src, src_pages, dst, dst_pages)
    assert_zero_except(dst, set(dst_pages))


@pytest.mark.parametrize("kind", ["corrupt-index", "corrupt-latent"])
def test_a_corrupted_transfer_fails_with_checksum_mismatch_once(make_pair, kind):
    src, dst, tx, rx = make_pair()
    tx.arm_fault(kind, count=1)
    rx.expect("bad", "prefill-0", [0, 1])
    assert tx.finish(send_all(tx, "bad", rx, [2, 3]), 10).checksum == cache_checksum(src, [2, 3])  # can't tell
    with pytest.raises(ChecksumMismatch) as e:
        rx.wait("bad", 10)
    assert e.value.reason == "checksum" and rx.poll("bad") == KVPoll.FAILED
    rx.release("bad")
    rx.expect("good", "prefill-0", [4, 5])
    tx.finish(send_all(tx, "good", rx, [2, 3]), 10)
    assert rx.wait("good", 10).checksum == cache_checksum(src, [2, 3])  # the fault was armed for one transfer
    assert_landed(src, [2, 3], dst, [4, 5])


def test_faults_are_validated_and_can_be_disarmed(make_pair):
    src, dst, tx, rx = make_pair()
    with pytest.raises(ValueError, match="unknown transfer fault"):
        tx.arm_fault("explode")
    with pytest.raises(ValueError):
        tx.arm_fault("corrupt-index", count=0)
    tx.arm_fault("corrupt-latent", count=3)
    tx.disarm_fault()
    rx.expect("t", "prefill-0", [0])
    tx.finish(send_all(tx, "t", rx, [1]), 10)
    rx.wait("t", 10)
    assert_landed(src, [1], dst, [0])


@pytest.mark.parametrize("differs", ["pages", "layers"])
def test_a_geometry_mismatch_fails_typed_and_writes_no_page(make_pair, differs):
    src, dst, tx, rx = make_pair()
    if differs == "pages":
        rx.expect("g", "prefill-0", [0, 1])
    else:
        rx.expect("g", "prefill-0", [0, 1, 2], num_layers=LAYERS - 1)
    tx.finish(send_all(tx, "g", rx, [1, 2, 3]), 10)  # the data was drained: the sender succeeded
    with pytest.raises(GeometryMismatch) as e:
        rx.wait("g", 10)
    assert e.value.reason == "geometry" and rx.poll("g") == KVPoll.FAILED
    assert_zero_except(dst, set())
    rx.expect("fine", "prefill-0", [5])
    tx.finish(send_all(tx, "fine", rx, [6]), 10)
    rx.wait("fine", 10)
    assert_landed(src, [6], dst, [5])


def test_a_transfer_nobody_sends_times_out_typed(make_pair):
    _, _, _, rx = make_pair(timeout_s=0.5)
    rx.expect("orphan", "prefill-0", [0])
    t0 = time.monotonic()
    with pytest.raises(StillInFlight):  # a short wait ends first: the transfer goes on
        rx.wait("orphan", 0.05)
    assert rx.poll("orphan") == KVPoll.BOOTSTRAPPING
    with pytest.raises(TransferTimeout) as e:
        rx.wait("orphan", 10)
    assert e.value.reason == "timeout" and rx.poll("orphan") == KVPoll.FAILED
    assert time.monotonic() - t0 < 3


def test_release_forgets_the_transfer_and_frees_its_pages(make_pair):
    src, dst, tx, rx = make_pair()
    rx.expect("gone", "prefill-0", [0, 1])
    rx.release("gone")
    with pytest.raises(KeyError):
        rx.poll("gone")
    tx.finish(send_all(tx, "gone", rx, [2, 3]), 10)  # sent after the release: dropped
    rx.expect("reuse", "prefill-0", [0, 1])  # the same pages, for another transfer
    tx.finish(send_all(tx, "reuse", rx, [4, 5]), 10)
    rx.wait("reuse", 10)
    assert_landed(src, [4, 5], dst, [0, 1])
    assert_zero_except(dst, {0, 1})
