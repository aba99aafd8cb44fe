"""The transfer's messages (``pair.message_plan``): bytes land bit-identical whatever the page layout and the
message sizes, received straight into the pages where they are a run, and a byte corrupted anywhere on the
wire (indexer or latent pages, staged or in place) fails the checksum. Both roles in this process (real gloo
groups over loopback); ``MIN_MESSAGE_BYTES`` is scaled down so that small caches exercise every plan shape.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dsv32_engine.transfer import ChecksumMismatch, KVReceiver, KVSender, cache_checksum
from dsv32_engine.transfer import issuer as issuer_mod
from dsv32_engine.transfer import pair as pair_mod
from dsv32_engine.transfer.pages import StagingPool
from test_transfer import assert_landed, assert_zero_except, make_cache

pytestmark = pytest.mark.timeout(60)

LAYERS, PAGES = 3, 12
LATENT = 41984  # fp8 latent page bytes (the indexer page is 8448)

# name: (chunk_bytes in latent pages, MIN_MESSAGE_BYTES in latent pages)
PLANS = {
    "one-message": (PAGES, 10**6),  # both pools of a layer packed into a single message
    "pool-a-message": (PAGES, 1),  # one message per pool per layer: each may travel in place
    "many-windows": (2, 1),  # each pool of each layer cut into 6 messages
    "packed-windows": (2, 5),  # small windows packed together, across the pools of a layer
}
LAYOUTS = {  # (source pages, destination pages)
    "run-to-run": (list(range(2, 10)), list(range(4, 12))),
    "scattered-to-run": ([9, 0, 5, 3, 11, 7, 1, 8], list(range(0, 8))),
    "run-to-scattered": (list(range(0, 8)), [10, 2, 7, 0, 5, 11, 3, 8]),
    "scattered-to-scattered": ([9, 0, 5, 3, 11, 7, 1, 8], [10, 2, 7, 0, 5, 11, 3, 8]),
}


@pytest.fixture
def plan_shape(request, monkeypatch):
    chunk_pages, min_pages = PLANS[request.param]
    monkeypatch.setattr(pair_mod, "MIN_MESSAGE_BYTES", min_pages * LATENT)
    return chunk_pages * LATENT


def send_all(tx: KVSender, tid: str, rx: KVReceiver, src_pages: list[int], pause_s: float = 0.0):
    h = tx.begin(tid, rx.endpoint, rx.worker_id, src_pages)
    for layer in range(h.num_layers):
        if pause_s:
            time.sleep(pause_s)
        tx.send_layer(h, layer)
    return h


def staged_bytes(rx: KVReceiver) -> list[int]:
    """Spy on the receiver's staging buffers: the bytes of every message that did not land in place."""
    taken, take = [], rx._staging.take

    def spy(nbytes, device):
        taken.append(nbytes)
        return take(nbytes, device)

    rx._staging.take = spy
    return taken


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("plan_shape", list(PLANS), indirect=True)
def test_pages_land_bit_identical_for_every_layout_and_message_plan(plan_shape, layout):
    src_pages, dst_pages = LAYOUTS[layout]
    src, dst = make_cache("fp8", LAYERS, PAGES, seed=11), make_cache("fp8", LAYERS, PAGES, seed=None)
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=10)
    tx = KVSender(src, "prefill-0", timeout_s=10, chunk_bytes=plan_shape, window_bytes=3 * plan_shape)
    staged = staged_bytes(rx)
    try:
        rx.expect("t", "prefill-0", dst_pages)
        sent = tx.finish(send_all(tx, "t", rx, src_pages), 10)
        got = rx.wait("t", 10)
        assert sent.checksum == got.checksum == cache_checksum(src, src_pages)
        assert sent.num_bytes == got.num_bytes == len(src_pages) * (LATENT + 8448) * LAYERS
        assert_landed(src, src_pages, dst, dst_pages)
        assert_zero_except(dst, set(dst_pages))
        plan = pair_mod.message_plan(LAYERS, len(src_pages), [8448, LATENT], plan_shape // LATENT)
        in_place = [m for i, m in enumerate(plan) if len(m.segments) == 1 and i > 0
                    and plan[i - 1].last_layer >= m.segments[0].layer]
        if layout.endswith("to-run") and in_place:  # received straight into the pages: never staged
            assert sum(staged) == sum(m.nbytes for m in plan) - sum(m.nbytes for m in in_place)
        else:
            assert sum(staged) == sum(m.nbytes for m in plan)
    finally:
        tx.close()
        rx.close()


def corrupt_message(monkeypatch, which: int, offset_of) -> list:
    """Flip one byte of message ``which`` on its way to the wire (after the sender's checksum)."""
    hit, put = [], issuer_mod.SendIssuer.put

    def spy(self, buf, tag, staging):
        if tag & 0xFFFF == which and not hit:
            buf = buf.clone()
            flat = buf.view(-1)
            offset = offset_of(flat.numel())
            flat[offset] ^= 0x01
            hit.append(offset)
        return put(self, buf, tag, staging)

    monkeypatch.setattr(issuer_mod.SendIssuer, "put", spy)
    return hit


@pytest.mark.parametrize("layout", ["run-to-run", "scattered-to-scattered"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("message", ["index-layer-0", "latent-layer-1", "latent-last-layer"])
def test_a_byte_corrupted_anywhere_in_indexer_or_latent_pages_is_caught(monkeypatch, layout, where, message):
    """Pool-a-message plan: messages alternate indexer (staged) and latent (in place on a run of pages)."""
    monkeypatch.setattr(pair_mod, "MIN_MESSAGE_BYTES", LATENT)
    which = {"index-layer-0": 0, "latent-layer-1": 3, "latent-last-layer": 2 * LAYERS - 1}[message]
    offset_of = {"first": lambda n: 0, "middle": lambda n: n // 2 + 5, "last": lambda n: n - 1}[where]
    src_pages, dst_pages = LAYOUTS[layout]
    src, dst = make_cache("fp8", LAYERS, PAGES, seed=12), make_cache("fp8", LAYERS, PAGES, seed=None)
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=10)
    tx = KVSender(src, "prefill-0", timeout_s=10, chunk_bytes=PAGES * LATENT)
    hit = corrupt_message(monkeypatch, which, offset_of)
    try:
        rx.expect("bad", "prefill-0", dst_pages)
        assert tx.finish(send_all(tx, "bad", rx, src_pages), 10).checksum == cache_checksum(src, src_pages)
        with pytest.raises(ChecksumMismatch):
            rx.wait("bad", 10)
        assert hit
        rx.release("bad")
        rx.expect("good", "prefill-0", dst_pages)  # the next transfer on the same pair is fine
        tx.finish(send_all(tx, "good", rx, src_pages), 10)
        rx.wait("good", 10)
        assert_landed(src, src_pages, dst, dst_pages)
        assert rx.pair_generation("prefill-0") == 1
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("kind", ["corrupt-index", "corrupt-latent"])
@pytest.mark.parametrize("layout", ["run-to-run", "scattered-to-scattered"])
def test_injected_faults_hit_staged_and_in_place_messages(monkeypatch, kind, layout):
    monkeypatch.setattr(pair_mod, "MIN_MESSAGE_BYTES", LATENT)
    src_pages, dst_pages = LAYOUTS[layout]
    src, dst = make_cache("fp8", LAYERS, PAGES, seed=13), make_cache("fp8", LAYERS, PAGES, seed=None)
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=10)
    tx = KVSender(src, "prefill-0", timeout_s=10, chunk_bytes=PAGES * LATENT, fault=kind)
    try:
        rx.expect("bad", "prefill-0", dst_pages)
        tx.finish(send_all(tx, "bad", rx, src_pages), 10)
        with pytest.raises(ChecksumMismatch):
            rx.wait("bad", 10)
        assert cache_checksum(src, src_pages) == cache_checksum(make_cache("fp8", LAYERS, PAGES, seed=13), src_pages)
    finally:
        tx.close()
        rx.close()


def test_release_while_messages_land_in_place_leaves_the_pages_alone_after_it_returns(monkeypatch):
    """Whenever ``release`` returns (here: somewhere in the middle of a slow transfer), no page changes later."""
    monkeypatch.setattr(pair_mod, "MIN_MESSAGE_BYTES", LATENT)
    src, dst = make_cache("fp8", 6, PAGES, seed=14), make_cache("fp8", 6, PAGES, seed=None)
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=10)
    tx = KVSender(src, "prefill-0", timeout_s=10, chunk_bytes=2 * LATENT)
    try:
        for delay in (0.02, 0.06, 0.1):
            rx.expect("cut", "prefill-0", list(range(8)))
            h = tx.begin("cut", rx.endpoint, rx.worker_id, list(range(2, 10)))
            sender = threading.Thread(target=lambda: [time.sleep(0.02) or tx.send_layer(h, layer)
                                                      for layer in range(6)])
            sender.start()
            time.sleep(delay)
            rx.release("cut")
            snapshot = [p.clone() for p in dst.latent + dst.index]
            sender.join()
            tx.finish(h, 10)  # drained: the sender succeeds
            time.sleep(0.05)
            assert all(torch.equal(a, b) for a, b in zip(snapshot, dst.latent + dst.index)), delay
        rx.expect("after", "prefill-0", [11])
        tx.finish(send_all(tx, "after", rx, [0]), 10)
        rx.wait("after", 10)
        assert rx.pair_generation("prefill-0") == 1
    finally:
        tx.close()
        rx.close()


def test_staging_pool_reuses_buffers():
    pool = StagingPool(1 << 20)
    a = pool.take(1000, torch.device("cpu"))
    pool.give(a)
    assert pool.take(900, torch.device("cpu")).data_ptr() == a.data_ptr()
