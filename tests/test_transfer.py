"""KV transfer between real processes on loopback: this process is the decode worker (``KVReceiver``),
prefill workers are subprocesses running this file as a script (``python test_transfer.py send SPEC``).

Source caches are filled from a seed, so both processes know the bytes that must arrive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from dsv32_kernels.layout import CacheLayout
from dsv32_engine.transfer import (ChecksumMismatch, KVPoll, KVReceiver, KVSender, PeerFailed, TransferError,
                                   cache_checksum)

LAYERS, PAGES = 4, 16


@dataclass
class FakeCache:
    """The three attributes the transfer relies on (stand-in for ``dsv32_engine.cache.KVCache``)."""

    layout: CacheLayout
    latent: list
    index: list


def make_cache(mode: str, layers: int, pages: int, seed: int | None, dtype=torch.float32,
               with_index: bool = True) -> FakeCache:
    """DeepSeek-V3.2 geometry; random bytes (any bit pattern, NaNs included) from ``seed``, or zeros."""
    layout = CacheLayout(512, 64, 128, mode=mode, dtype=dtype)
    gen = torch.Generator().manual_seed(seed or 0)

    def pool(shape):
        t = torch.zeros(shape, dtype=layout.pool_dtype)
        if seed is not None:
            raw = t.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
        return t

    index_pages = pages if with_index else 0
    return FakeCache(layout, [pool(layout.latent_pool_shape(pages)) for _ in range(layers)],
                     [pool(layout.index_pool_shape(index_pages)) for _ in range(layers)])


def assert_landed(src: FakeCache, src_pages: list[int], dst: FakeCache, dst_pages: list[int]) -> None:
    for layer in range(len(src.latent)):
        assert torch.equal(dst.latent[layer][dst_pages].view(torch.uint8),
                           src.latent[layer][src_pages].view(torch.uint8))
        if src.index[layer].shape[0]:  # an empty index pool: a model without an indexer
            assert torch.equal(dst.index[layer][dst_pages].view(torch.uint8),
                               src.index[layer][src_pages].view(torch.uint8))


def assert_zero_except(dst: FakeCache, written: set[int]) -> None:
    others = [p for p in range(dst.latent[0].shape[0]) if p not in written]
    for pool in dst.latent + dst.index:
        if pool.shape[0]:
            assert not pool[others].view(torch.uint8).any(), "a page outside the transfers was written"


# -- the prefill-worker subprocess ---------------------------------------------------------
def _sender_main(spec: dict) -> None:
    """Run each job: one KVSender; transfers begun together, layers handed over round-robin, then finished."""
    for job in spec["jobs"]:
        cache = make_cache(spec["mode"], LAYERS, PAGES, job["seed"])
        tx = KVSender(cache, job["worker_id"], timeout_s=job.get("timeout", 10), ordered=job.get("ordered"),
                      chunk_bytes=job.get("chunk_pages", 64) * cache.layout.latent_page_bytes)
        if job.get("fault"):
            tx.arm_fault(*job["fault"])
        batches = [[t] for t in job["transfers"]] if job.get("sequential") else [job["transfers"]]
        for batch in batches:
            handles = [tx.begin(t["tid"], job["endpoint"], job["decode_id"], t["pages"]) for t in batch]
            for layer in range(LAYERS):
                for h in handles:
                    tx.send_layer(h, layer)
                if job.get("die_after_layer") == layer:  # crash mid-transfer, once the group is up and sending
                    while tx.poll(handles[0]) < KVPoll.TRANSFERRING:
                        time.sleep(0.01)
                    time.sleep(0.3)
                    os._exit(17)
            for h in handles:
                try:
                    r = tx.finish(h, 20)
                    out = {"tid": h.transfer_id, "ok": True, "checksum": r.checksum, "num_bytes": r.num_bytes}
                except TransferError as e:
                    out = {"tid": h.transfer_id, "ok": False, "error": str(e)}
                print(json.dumps(out), flush=True)
        tx.close()



def spawn_sender(mode: str, *jobs: dict) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DSV32_TRANSFER_FAULT", None)
    spec = json.dumps({"mode": mode, "jobs": list(jobs)})
    return subprocess.Popen([sys.executable, __file__, "send", spec], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def sender_results(proc: subprocess.Popen, expect_rc: int = 0) -> dict[str, dict]:
    out, err = proc.communicate(timeout=40)
    assert proc.returncode == expect_rc, f"sender exited {proc.returncode}:\n{err[-3000:]}"
    return {r["tid"]: r for r in map(json.loads, out.splitlines())}


def job(rx: KVReceiver, worker_id: str, seed: int, plan: dict, **extra) -> dict:
    transfers = [{"tid": tid, "pages": src} for tid, (src, _) in plan.items()]
    return {"worker_id": worker_id, "seed": seed, "endpoint": rx.endpoint, "decode_id": rx.worker_id,
            "transfers": transfers, **extra}


def check_plan(rx: KVReceiver, sent: dict, src: FakeCache, dst: FakeCache, plan: dict) -> None:
    layout = src.layout
    for tid, (src_pages, dst_pages) in plan.items():
        got = rx.wait(tid, 20)
        assert sent[tid]["ok"], sent[tid]
        assert sent[tid]["num_bytes"] == got.num_bytes == \
            len(src_pages) * (layout.latent_page_bytes + layout.index_page_bytes) * LAYERS
        assert sent[tid]["checksum"] == got.checksum == cache_checksum(src, src_pages)
        assert_landed(src, src_pages, dst, dst_pages)
        rx.release(tid)


# -- tests ----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode,ordered", [("exact", False), ("fp8", False), ("fp8", True)],
                         ids=["exact", "fp8", "fp8-ordered"])
def test_interleaved_transfers_on_one_pair_arrive_bit_identical(mode, ordered):
    """Four transfers in flight on one pair, layers interleaved; different page ids on both sides;
    two pages a message, so runs and scattered pages mix within a transfer.

    ``ordered`` is what NCCL needs (no tags): transfers on a pair go one after another in sequence order.
    """
    src, dst = make_cache(mode, LAYERS, PAGES, seed=1), make_cache(mode, LAYERS, PAGES + 4, seed=None)
    plan = {"frag": ([3, 0, 5], [7, 1, 19]), "run": ([8, 9, 10, 11], [2, 3, 4, 5]), "one": ([15], [0]),
            "reversed": ([14, 13, 12], [11, 10, 12])}
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=10, ordered=ordered)
    try:
        for tid, (_, dst_pages) in plan.items():
            rx.expect(tid, "prefill-0", dst_pages)
        sent = sender_results(spawn_sender(mode, job(rx, "prefill-0", 1, plan, ordered=ordered, chunk_pages=2)))
        check_plan(rx, sent, src, dst, plan)
        assert_zero_except(dst, {p for _, d in plan.values() for p in d})
        assert rx.pair_generation("prefill-0") == 1  # one group, reused by every transfer
    finally:
        rx.close()


@pytest.mark.timeout(60)
def test_two_prefill_processes_send_to_one_decode_concurrently():
    src0, src1 = make_cache("fp8", LAYERS, PAGES, seed=10), make_cache("fp8", LAYERS, PAGES, seed=11)
    dst = make_cache("fp8", LAYERS, 24, seed=None)
    plan0 = {"a0": ([1, 2, 3], [10, 11, 12]), "a1": ([4, 6], [3, 5])}
    plan1 = {"b0": ([1, 2, 3], [0, 1, 2]), "b1": ([7], [20])}
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=10)
    try:
        rx.expect("a0", "prefill-0", plan0["a0"][1])
        rx.expect("b0", "prefill-1", plan1["b0"][1])
        procs = [spawn_sender("fp8", job(rx, "prefill-0", 10, plan0)),
                 spawn_sender("fp8", job(rx, "prefill-1", 11, plan1))]
        time.sleep(0.5)  # the other two are expected after their senders began: announcements wait in the store
        rx.expect("a1", "prefill-0", plan0["a1"][1])
        rx.expect("b1", "prefill-1", plan1["b1"][1])
        sent = [sender_results(p) for p in procs]
        check_plan(rx, sent[0], src0, dst, plan0)
        check_plan(rx, sent[1], src1, dst, plan1)
        assert rx.pair_generation("prefill-0") == rx.pair_generation("prefill-1") == 1
    finally:
        rx.close()


@pytest.mark.timeout(60)
def test_sender_death_fails_the_transfer_and_a_restarted_sender_rebuilds_the_group():
    timeout = 8.0
    src, dst = make_cache("fp8", LAYERS, PAGES, seed=3), make_cache("fp8", LAYERS, PAGES, seed=None)
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=timeout)
    try:
        rx.expect("doomed", "prefill-0", [0, 1, 2])
        proc = spawn_sender("fp8", job(rx, "prefill-0", 3, {"doomed": ([5, 6, 7], None)}, die_after_layer=1))
        t0 = time.monotonic()
        with pytest.raises(PeerFailed):
            rx.wait("doomed", 30)
        assert rx.poll("doomed") == KVPoll.FAILED
        assert time.monotonic() - t0 < timeout  # a closed connection, not the timeout
        sender_results(proc, expect_rc=17)
        assert rx.pair_generation("prefill-0") is None  # generation 1 is broken

        plan = {"phoenix": ([5, 6, 7], [8, 9, 10])}
        rx.expect("phoenix", "prefill-0", plan["phoenix"][1])
        check_plan(rx, sender_results(spawn_sender("fp8", job(rx, "prefill-0", 3, plan))), src, dst, plan)
        assert rx.pair_generation("prefill-0") == 2
    finally:
        rx.close()


@pytest.mark.timeout(60)
def test_a_corrupted_indexer_page_fails_the_checksum_and_the_group_survives():
    src, dst = make_cache("fp8", LAYERS, PAGES, seed=4), make_cache("fp8", LAYERS, PAGES, seed=None)
    plan = {"bad": ([1, 2], [3, 4]), "good": ([1, 2], [5, 6])}
    rx = KVReceiver(dst, "127.0.0.1", 0, "decode-0", timeout_s=10)
    try:
        for tid, (_, dst_pages) in plan.items():
            rx.expect(tid, "prefill-0", dst_pages)
        sent = sender_results(spawn_sender("fp8", job(rx, "prefill-0", 4, plan, fault=["corrupt-index", 1],
                                                      sequential=True)))
        assert sent["bad"]["ok"] and sent["bad"]["checksum"] == cache_checksum(src, [1, 2])  # sender can't tell
        with pytest.raises(ChecksumMismatch):
            rx.wait("bad", 20)
        check_plan(rx, sent, src, dst, {"good": plan["good"]})
        assert rx.pair_generation("prefill-0") == 1
    finally:
        rx.close()


if __name__ == "__main__" and sys.argv[1:2] == ["send"]:
    torch.set_num_threads(1)
    _sender_main(json.loads(sys.argv[2]))
