"""KV transfer edge cases with both roles in this process (real gloo groups over loopback, threads)."""

from __future__ import annotations

import time

import pytest
import torch

from dsv32_engine.transfer import (GeometryMismatch, KVPoll, KVReceiver, KVSender, TransferError, TransferTimeout,
                                   cache_checksum)
from dsv32_engine.transfer.pages import Checksum
from dsv32_engine.transfer.pair import SEQ_MOD, Announcement, chunk_ranges, pages_per_chunk, tag
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


def test_tags_are_distinct_per_transfer_layer_pool_and_chunk_and_fit_a_c_int():
    tags = {tag(seq, layer, part, chunk) for seq in range(12) for layer in range(62) for part in (0, 1)
            for chunk in (0, 1, 7, 255)}
    assert len(tags) == 12 * 62 * 2 * 4
    assert max(tag(SEQ_MOD - 1, 255, 1, 255), tag(10**9, 255, 1, 255)) < 2**31
    assert tag(SEQ_MOD + 3, 1, 0, 2) == tag(3, 1, 0, 2)  # sequence numbers wrap
    for bad in ((0, 256, 0, 0), (0, 0, 2, 0), (0, 0, 0, 256)):
        with pytest.raises(ValueError):
            tag(*bad)


def test_chunking_covers_every_page_once_in_at_most_256_messages():
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert pages_per_chunk(16, 41984, 2 << 20) == 49
    big = pages_per_chunk(100_000, 41984, 2 << 20)
    assert len(chunk_ranges(100_000, big)) <= 256


def test_announcement_roundtrip():
    ann = Announcement("t", "prefill-0", 3, 7, 61, 12, 41984, 8448, "gloo", False, 49)
    assert Announcement.decode(ann.encode()) == ann


def test_checksum_sees_any_change_order_or_missing_part():
    cache = make_cache("exact", 2, 4, seed=1, dtype=torch.bfloat16)
    base = cache_checksum(cache, [2, 0])
    assert base == cache_checksum(cache, [2, 0]) and base.startswith("kv1:")
    assert base != cache_checksum(cache, [0, 2])  # pages out of place
    assert base != cache_checksum(cache, [2, 0], num_layers=1)

    def changed(edit) -> str:
        c = make_cache("exact", 2, 4, seed=1, dtype=torch.bfloat16)
        edit(c.index[1][2].view(torch.uint8).view(-1))  # the indexer page of the last layer
        return cache_checksum(c, [2, 0])

    def swap_words(b):
        first = b[:8].clone()
        b[:8] = b[8:16]
        b[8:16] = first

    assert changed(lambda b: b.__setitem__(5, b[5] ^ 1)) != base  # one bit
    assert changed(swap_words) != base  # a permutation within a page keeps a plain sum
    assert changed(lambda b: b.zero_()) != base  # a missing indexer page
    ck = Checksum()
    ck.update(torch.zeros(2, 16, dtype=torch.uint8))
    other = Checksum()
    other.update(torch.zeros(1, 16, dtype=torch.uint8))
    assert ck.hexdigest() != other.hexdigest()  # page count counts, even for zero pages


@pytest.mark.parametrize("window_pages,chunk_pages", [(1, 1), (3, 2), (64, 64)])
def test_bf16_without_indexer_small_windows_and_chunks(window_pages, chunk_pages):
    """Exact bf16 pools travel as bytes; an empty index pool (no indexer) sends nothing for it."""
    src = make_cache("exact", 6, 8, seed=2, dtype=torch.bfloat16, with_index=False)
    dst = make_cache("exact", 6, 8, seed=None, dtype=torch.bfloat16, with_index=False)
    page = src.layout.latent_page_bytes
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=10, window_bytes=window_pages * page)
    tx = KVSender(src, "prefill-0", timeout_s=10, window_bytes=window_pages * page, chunk_bytes=chunk_pages * page)
    src_pages, dst_pages = [1, 3, 4, 5, 0], [6, 7, 2, 0, 5]
    try:
        rx.expect("t", "prefill-0", dst_pages)
        sent = tx.finish(send_all(tx, "t", rx, src_pages), 10)
        got = rx.wait("t", 10)
        assert sent.num_bytes == got.num_bytes == len(src_pages) * src.layout.latent_page_bytes * 6
        assert sent.checksum == got.checksum == cache_checksum(src, src_pages)
        assert_landed(src, src_pages, dst, dst_pages)
        assert_zero_except(dst, set(dst_pages))
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("pair", [0.5], indirect=True)
def test_a_transfer_nobody_sends_fails_within_the_timeout(pair):
    _, _, rx, _ = pair
    rx.expect("orphan", "prefill-0", [0])
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
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
        with pytest.raises(TransferTimeout):  # the receiver joined the group but never posted receives
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
    with pytest.raises(GeometryMismatch):
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
