"""KV transfer edge cases with both roles in this process (real gloo groups over loopback, threads)."""

from __future__ import annotations

import time

import pytest
import torch

from dsv32_engine.transfer import (GeometryMismatch, KVPoll, KVReceiver, KVSender, TransferError, TransferTimeout,
                                   cache_checksum)
from dsv32_engine.transfer.pages import Checksum
from dsv32_engine.transfer.pair import MAX_WINDOWS, MIN_MESSAGE_BYTES, SEQ_MOD, Announcement, message_plan, tag
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


def test_tags_are_distinct_per_transfer_and_message_and_fit_a_c_int():
    tags = {tag(seq, m) for seq in range(12) for m in (0, 1, 7, 255, 65535)}
    assert len(tags) == 12 * 5
    assert max(tag(SEQ_MOD - 1, 65535), tag(10**9, 65535)) < 2**31
    assert tag(SEQ_MOD + 3, 2) == tag(3, 2)  # sequence numbers wrap
    for bad in (-1, 65536):
        with pytest.raises(ValueError):
            tag(0, bad)


@pytest.mark.parametrize("pages,chunk_pages", [(16, 49), (256, 199), (1000, 3), (100_000, 199), (7, 1)])
def test_message_plan_covers_every_page_of_every_pool_once_in_wire_order(pages, chunk_pages):
    part_bytes = [8448, 41984]  # fp8: indexer, then latent
    plan = message_plan(4, pages, part_bytes, chunk_pages)
    flat = [(s.layer, s.part, p) for m in plan for s in m.segments for p in range(s.a, s.b)]
    assert flat == [(layer, part, p) for layer in range(4) for part in (0, 1) for p in range(pages)]
    assert all(s.page_bytes == part_bytes[s.part] for m in plan for s in m.segments)
    windows = {}
    for m in plan:
        for s in m.segments:
            windows[s.layer, s.part] = windows.get((s.layer, s.part), 0) + 1
    assert max(windows.values()) <= MAX_WINDOWS
    for m in plan:
        assert m.nbytes <= max(chunk_pages * 41984, -(-pages // MAX_WINDOWS) * 41984) + MIN_MESSAGE_BYTES
        if len(m.segments) > 1:  # only small pieces of one layer are packed together
            assert all(s.nbytes < MIN_MESSAGE_BYTES for s in m.segments)
            assert len({s.layer for s in m.segments}) == 1


def test_message_plan_packs_short_prompts_and_keeps_long_ones_a_pool_a_message():
    short = message_plan(8, 16, [8448, 41984], 199)  # 1k tokens: 0.8 MB a layer, never across layers
    assert [[(s.layer, s.part) for s in m.segments] for m in short] == [[(i, 0), (i, 1)] for i in range(8)]
    long = message_plan(8, 256, [8448, 41984], 199)  # 16k tokens: 2.2 MB indexer + 2 x 5.4 MB latent a layer
    assert len(long) == 24 and all(len(m.segments) == 1 for m in long)


def test_announcement_roundtrip():
    ann = Announcement("t", "prefill-0", 3, 7, 61, 12, 41984, 8448, "gloo", False, 49)
    assert Announcement.decode(ann.encode()) == ann
    assert ann.part_bytes == [8448, 41984]  # the indexer travels first


def test_checksum_sees_any_change_order_or_missing_part():
    cache = make_cache("exact", 2, 4, seed=1, dtype=torch.bfloat16)
    base = cache_checksum(cache, [2, 0])
    assert base == cache_checksum(cache, [2, 0]) and base.startswith("kv2:")
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
    ck = Checksum("cpu")
    ck.update(torch.zeros(2, 16, dtype=torch.uint8))
    other = Checksum("cpu")
    other.update(torch.zeros(1, 16, dtype=torch.uint8))
    assert ck.hexdigest() != other.hexdigest()  # page count counts, even for zero pages
    split = Checksum("cpu")
    for half in torch.arange(64, dtype=torch.uint8).view(2, 2, 16):
        split.update(half)
    whole = Checksum("cpu")
    whole.update(torch.arange(64, dtype=torch.uint8).view(4, 16))
    assert split.hexdigest() == whole.hexdigest()  # where messages and blocks are cut does not matter


@pytest.mark.parametrize("pool", ["latent", "index"])
@pytest.mark.parametrize("layer", [0, 2])
def test_checksum_sees_a_changed_byte_anywhere_in_any_pool(pool, layer):
    cache = make_cache("fp8", 3, 4, seed=5)
    base = cache_checksum(cache, [3, 1, 2])
    size = getattr(cache, pool)[layer][1].view(torch.uint8).numel()
    for offset in (0, 1, size // 2 + 3, size - 1):
        c = make_cache("fp8", 3, 4, seed=5)
        getattr(c, pool)[layer][1].view(torch.uint8).view(-1)[offset] ^= 0x10
        assert cache_checksum(c, [3, 1, 2]) != base, (pool, layer, offset)
    c = make_cache("fp8", 3, 4, seed=5)
    getattr(c, pool)[layer][0].view(torch.uint8).view(-1)[0] ^= 0x10
    assert cache_checksum(c, [3, 1, 2]) == base  # a page outside the transfer


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
