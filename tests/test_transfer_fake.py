"""The in-process fake backend: same interface, same bytes and checksums as the real one."""

from __future__ import annotations

import pytest

from dsv32_engine.transfer import (ChecksumMismatch, KVPoll, PeerUnreachable, TransferError, TransferTimeout,
                                   cache_checksum)
from dsv32_engine.transfer.fake import FakeKVReceiver, FakeKVSender, FakeTransferHub
from test_transfer import assert_landed, assert_zero_except, make_cache


@pytest.fixture
def fake():
    hub = FakeTransferHub()
    src, dst = make_cache("fp8", 3, 6, seed=5), make_cache("fp8", 3, 6, seed=None)
    rx = FakeKVReceiver(dst, worker_id="decode-0", timeout_s=5, hub=hub)
    return src, dst, rx, hub


def send_all(tx, tid, rx, pages):
    h = tx.begin(tid, rx.endpoint, "decode-0", pages)
    for layer in range(3):
        tx.send_layer(h, layer)
    return h


@pytest.mark.parametrize("expect_first", [True, False], ids=["expect-then-send", "send-then-expect"])
def test_fake_copies_pages_and_reports_like_the_real_backend(fake, expect_first):
    src, dst, rx, hub = fake
    tx = FakeKVSender(src, "prefill-0", hub=hub)
    if expect_first:
        rx.expect("t", "prefill-0", [4, 0])
        assert rx.poll("t") == KVPoll.BOOTSTRAPPING
    h = tx.begin("t", rx.endpoint, "decode-0", [1, 2])
    assert tx.poll(h) == KVPoll.WAITING
    tx.send_layer(h, 0)
    assert tx.poll(h) == KVPoll.TRANSFERRING
    tx.send_layer(h, 1)
    tx.send_layer(h, 2)
    sent = tx.finish(h, 1)
    if not expect_first:
        rx.expect("t", "prefill-0", [4, 0])
    got = rx.wait("t", 1)
    assert rx.poll("t") == KVPoll.SUCCESS
    page_bytes = src.layout.latent_page_bytes + src.layout.index_page_bytes
    assert sent.num_bytes == got.num_bytes == 2 * page_bytes * 3
    assert sent.checksum == got.checksum == cache_checksum(src, [1, 2])
    assert_landed(src, [1, 2], dst, [4, 0])
    assert_zero_except(dst, {4, 0})


def test_fake_corruption_fails_the_checksum(fake):
    src, dst, rx, hub = fake
    tx = FakeKVSender(src, "prefill-0", hub=hub)
    tx.arm_fault("corrupt-index", count=1)
    rx.expect("bad", "prefill-0", [0])
    tx.finish(send_all(tx, "bad", rx, [1]), 1)
    with pytest.raises(ChecksumMismatch):
        rx.wait("bad", 1)
    assert rx.poll("bad") == KVPoll.FAILED
    rx.expect("good", "prefill-0", [2])
    tx.finish(send_all(tx, "good", rx, [1]), 1)
    assert rx.wait("good", 1).checksum == cache_checksum(src, [1])


def test_fake_timeouts_release_and_wrong_peers(fake):
    src, dst, rx, hub = fake
    rx.timeout_s = 0.05
    rx.expect("orphan", "prefill-0", [0])
    with pytest.raises(TransferTimeout):
        rx.wait("orphan", 5)
    assert rx.poll("orphan") == KVPoll.FAILED
    rx.release("orphan")
    with pytest.raises(KeyError):
        rx.poll("orphan")
    tx = FakeKVSender(src, "prefill-0", hub=hub)
    with pytest.raises(PeerUnreachable):
        tx.begin("x", "fake:999", "decode-0", [0])
    with pytest.raises(PeerUnreachable):
        tx.begin("x", rx.endpoint, "decode-9", [0])
    rx.timeout_s = 5
    rx.expect("mixup", "prefill-1", [0])
    tx.finish(send_all(tx, "mixup", rx, [1]), 1)
    with pytest.raises(TransferError, match="unexpected data"):
        rx.wait("mixup", 1)
    rx.close()
    with pytest.raises(PeerUnreachable):
        tx.begin("y", rx.endpoint, "decode-0", [0])
