"""KV transfer edge cases with both roles in this process (real gloo groups over loopback, threads)."""

from __future__ import annotations

import time
import zlib

import pytest
import torch

from dsv32_engine.transfer import KVPoll, KVReceiver, KVSender, TransferError, cache_checksum
from dsv32_engine.transfer_pair import SEQ_MOD, Announcement, tag
from test_transfer import assert_landed, assert_zero_except, make_cache

pytestmark = pytest.mark.timeout(60)


def send_all(tx: KVSender, tid: str, rx: KVReceiver, src_pages: list[int], layers: int | None = None):
    h = tx.begin(tid, rx.endpoint, rx.worker_id, src_pages, num_layers=layers)
    for layer in range(h.num_layers):
        tx.send_layer(h, layer)
    return h


@pytest.fixture
def pair(request):
    """A receiver and a sender on fp8 caches (4 layers, 8 pages), closed after the test."""
    timeout = getattr(request, "param", 10.0)
    src, dst = make_cache("fp8", 4, 8, seed=7), make_cache("fp8", 4, 8, seed=None)
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=timeout)
    tx = KVSender(src, "prefill-0", timeout_s=timeout)
    yield src, dst, rx, tx
    tx.close()
    rx.close()


def test_tags_are_distinct_per_transfer_layer_and_pool_and_fit_a_c_int():
    tags = {tag(seq, layer, part) for seq in range(40) for layer in range(62) for part in (0, 1)}
    assert len(tags) == 40 * 62 * 2
    assert max(tag(SEQ_MOD - 1, 255, 1), tag(10**9, 255, 1)) < 2**31
    with pytest.raises(ValueError):
        tag(0, 256, 0)


def test_announcement_roundtrip():
    ann = Announcement("t", "prefill-0", 3, 7, 61, 12, 41984, 8448, "gloo", False)
    assert Announcement.decode(ann.encode()) == ann


def test_checksum_is_crc32_of_the_page_bytes_in_layer_order():
    cache = make_cache("exact", 2, 4, seed=1, dtype=torch.bfloat16)
    crc = 0
    for layer in range(2):
        for pool in (cache.latent[layer], cache.index[layer]):
            crc = zlib.crc32(pool[[2, 0]].contiguous().view(torch.uint8).numpy(), crc)
    assert cache_checksum(cache, [2, 0]) == f"crc32:{crc:08x}"


@pytest.mark.parametrize("window", [1, 3])
def test_bf16_without_indexer_and_small_windows(window):
    """Exact bf16 pools travel as bytes; an empty index pool (no indexer) sends nothing for it."""
    src = make_cache("exact", 6, 5, seed=2, dtype=torch.bfloat16, with_index=False)
    dst = make_cache("exact", 6, 5, seed=None, dtype=torch.bfloat16, with_index=False)
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=10, window_layers=window)
    tx = KVSender(src, "prefill-0", timeout_s=10, window_layers=window)
    try:
        rx.expect("t", "prefill-0", [4, 0])
        sent = tx.finish(send_all(tx, "t", rx, [1, 3]), 10)
        got = rx.wait("t", 10)
        assert sent.num_bytes == got.num_bytes == 2 * src.layout.latent_page_bytes * 6
        assert sent.checksum == got.checksum == cache_checksum(src, [1, 3])
        assert_landed(src, [1, 3], dst, [4, 0])
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("pair", [0.5], indirect=True)
def test_a_transfer_nobody_sends_fails_within_the_timeout(pair):
    _, _, rx, _ = pair
    rx.expect("orphan", "prefill-0", [0])
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="no announcement"):
        rx.wait("orphan", 10)
    assert rx.poll("orphan") == KVPoll.FAILED
    assert time.monotonic() - t0 < 3


def test_a_sender_whose_receiver_never_expects_fails_then_rebuilds():
    src, dst = make_cache("fp8", 2, 4, seed=1), make_cache("fp8", 2, 4, seed=None)
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=10)
    tx = KVSender(src, "prefill-0", timeout_s=1.0)
    try:
        h = send_all(tx, "unexpected", rx, [0])
        t0 = time.monotonic()
        with pytest.raises(TransferError):  # the receiver joined the group but never posted receives
            tx.finish(h, 10)
        assert tx.poll(h) == KVPoll.FAILED and time.monotonic() - t0 < 3
        tx.timeout_s = 10
        rx.expect("next", "prefill-0", [1])
        tx.finish(send_all(tx, "next", rx, [2]), 10)
        rx.wait("next", 10)
        assert rx.pair_generation("prefill-0") == 2  # generation 1 died with the timed-out send
        assert_landed(src, [2], dst, [1])
    finally:
        tx.close()
        rx.close()


def test_geometry_mismatch_is_drained_reported_and_the_group_kept(pair):
    src, dst, rx, tx = pair
    rx.expect("short", "prefill-0", [0, 1])
    tx.finish(send_all(tx, "short", rx, [1, 2, 3]), 10)  # the data was drained: the sender succeeded
    with pytest.raises(TransferError, match="geometry mismatch"):
        rx.wait("short", 10)
    assert_zero_except(dst, set())
    rx.expect("fine", "prefill-0", [5])
    tx.finish(send_all(tx, "fine", rx, [6]), 10)
    rx.wait("fine", 10)
    assert_landed(src, [6], dst, [5])
    assert rx.pair_generation("prefill-0") == 1


def test_released_transfers_are_drained_without_touching_the_pages(pair):
    src, dst, rx, tx = pair
    rx.expect("cancelled-early", "prefill-0", [0, 1])
    rx.release("cancelled-early")  # before the sender announced
    rx.expect("cancelled-late", "prefill-0", [2])
    h = tx.begin("cancelled-late", rx.endpoint, "decode-0", [4])
    tx.send_layer(h, 0)
    rx.release("cancelled-late")  # while in flight
    for layer in range(1, 4):
        tx.send_layer(h, layer)
    tx.finish(h, 10)
    tx.finish(send_all(tx, "cancelled-early", rx, [1, 2]), 10)
    with pytest.raises(KeyError):
        rx.poll("cancelled-late")
    assert_zero_except(dst, set())
    rx.expect("after", "prefill-0", [3])
    tx.finish(send_all(tx, "after", rx, [5]), 10)
    rx.wait("after", 10)
    assert rx.pair_generation("prefill-0") == 1  # nothing was left pending on the pair


def test_misuse_is_refused(pair):
    _, _, rx, tx = pair
    with pytest.raises(ValueError):
        rx.expect("bad", "prefill-0", [0, 0])
    with pytest.raises(ValueError):
        rx.expect("bad", "prefill-0", [8])
    with pytest.raises(ValueError):
        rx.expect("bad", "prefill-0", [0], num_layers=5)
    with pytest.raises(KeyError):
        rx.poll("never")
    rx.expect("t", "prefill-0", [0])
    with pytest.raises(ValueError):
        rx.expect("t", "prefill-0", [1])
    h = tx.begin("t", rx.endpoint, "decode-0", [0])
    with pytest.raises(ValueError):
        tx.send_layer(h, 1)
    tx.send_layer(h, 0)
    with pytest.raises(TransferError, match="before layer 1"):
        tx.finish(h, 1)
    for layer in range(1, 4):
        tx.send_layer(h, layer)
    tx.finish(h, 10)
    with pytest.raises(ValueError):
        KVSender(make_cache("fp8", 1, 1, seed=None), "p", fault="explode")
