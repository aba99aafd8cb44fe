"""The Redis state module against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest

from dsv32_cluster.state import AsyncClusterState, ClusterState, InvalidTransition, WorkerInfo


@pytest.fixture
def state(redis_url):
    st = ClusterState.from_url(redis_url, prefix="t:", heartbeat_ttl_s=0.3)
    yield st
    st.client.close()


def test_worker_registry_heartbeat_and_expiry(state):
    d = WorkerInfo("d0", "decode", "127.0.0.1:1", transfer_endpoint="127.0.0.1:2", free_pages=10, total_pages=16)
    p = WorkerInfo("p0", "prefill", "127.0.0.1:3", queued_tokens=5)
    state.register(d)
    state.register(p)
    assert {w.worker_id for w in state.workers()} == {"d0", "p0"}
    [got] = state.workers("decode")
    assert (got.free_pages, got.total_pages, got.transfer_endpoint) == (10, 16, "127.0.0.1:2")
    assert isinstance(got.updated_at, float) and got.updated_at > 0
    # p0 keeps heartbeating, d0 goes silent: it vanishes after the TTL.
    deadline = time.time() + 0.6
    while time.time() < deadline:
        p.queued_tokens += 1
        state.heartbeat(p)
        time.sleep(0.1)
    assert [w.worker_id for w in state.workers()] == ["p0"]
    assert state.client.zrange(state.keys.workers, 0, -1) == ["p0"], "dead members are pruned from the index"
    assert state.workers("prefill")[0].queued_tokens == p.queued_tokens
    state.deregister("p0")
    assert state.workers() == []


def test_worker_role_is_checked():
    with pytest.raises(ValueError, match="role"):
        WorkerInfo("x", "router", "h:1")


def test_request_state_machine(state):
    state.create_request("r1", router="rt", session_id="s", prompt_tokens=7)
    rec = state.request("r1")
    assert rec["state"] == "queued" and rec["attempts"] == "1" and rec["prompt_tokens"] == "7"
    assert state.transition("r1", "prefilling", prefill_worker="p0", decode_worker="d0") == "queued"
    state.transition("r1", "transferring")
    with pytest.raises(InvalidTransition, match="transferring.*finished"):
        state.transition("r1", "finished")  # must decode first
    state.transition("r1", "queued", error="checksum mismatch")  # retry
    assert state.request("r1")["attempts"] == "2"
    for s in ("prefilling", "transferring", "decoding"):
        state.transition("r1", s)
    state.transition("r1", "finished", finish_reason="length", completion_tokens=4)
    rec = state.request("r1")
    assert rec["state"] == "finished" and rec["finish_reason"] == "length"
    for s in ("queued", "prefilling", "transferring", "decoding", "finished"):
        assert float(rec[f"{s}_at"]) <= float(rec["updated_at"])
    assert float(rec["created_at"]) <= float(rec["queued_at"]) <= float(rec["prefilling_at"]) <= float(rec["finished_at"])
    for s in ("cancelled", "failed", "queued", "decoding"):
        with pytest.raises(InvalidTransition):
            state.transition("r1", s)  # terminal is terminal
    with pytest.raises(InvalidTransition, match="missing"):
        state.transition("nope", "prefilling")
    with pytest.raises(ValueError, match="unknown request state"):
        state.transition("r1", "exploded")
    assert state.recent_requests() == ["r1"]
    assert 0 < state.client.ttl(state.keys.request("r1")) <= state.record_ttl_s


def test_cancel_from_any_in_progress_state(state):
    for i, s in enumerate(("queued", "prefilling", "transferring", "decoding")):
        rid = f"c{i}"
        state.create_request(rid)
        for step in ("prefilling", "transferring", "decoding")[: i]:
            state.transition(rid, step)
        assert state.request(rid)["state"] == s
        state.transition(rid, "cancelled", error="client cancelled")
        assert state.request(rid)["state"] == "cancelled"


def test_sessions(state):
    assert state.session("s1") == {}
    state.record_turn("s1", "r1", "d0", prompt_tokens=10, completion_tokens=5)
    state.record_turn("s1", "r2", "d0", prompt_tokens=30, completion_tokens=6)
    sess = state.session("s1")
    assert sess["decode_worker"] == "d0" and sess["turns"] == "2" and sess["last_request_id"] == "r2"
    assert (sess["prompt_tokens"], sess["completion_tokens"]) == ("40", "11")
    assert state.session_turns("s1") == ["r1", "r2"]
    assert 0 < state.client.ttl(state.keys.session("s1")) <= state.session_ttl_s
    assert 0 < state.client.ttl(state.keys.session_turns("s1")) <= state.session_ttl_s


def test_async_state_matches_sync(redis_url, state):
    async def go():
        ast = AsyncClusterState.from_url(redis_url, prefix="t:")
        try:
            await ast.register(WorkerInfo("d1", "decode", "h:1", free_pages=3))
            assert [w.free_pages for w in await ast.workers("decode")] == [3]
            await ast.create_request("a1", router="x")
            await ast.transition("a1", "prefilling")
            with pytest.raises(InvalidTransition):
                await ast.transition("a1", "finished")
            await ast.transition("a1", "cancelled")
            await ast.record_turn("s", "a1", "d1", 1, 2)
            assert (await ast.session("s"))["decode_worker"] == "d1"
        finally:
            await ast.aclose()

    asyncio.run(go())
    assert state.request("a1")["state"] == "cancelled"
    assert state.session("s")["turns"] == "1"


def test_request_ids_are_unique(state):
    assert state.create_request("u1", router="a")
    state.transition("u1", "prefilling")
    assert not state.create_request("u1", router="b")
    rec = state.request("u1")
    assert rec["router"] == "a" and rec["state"] == "prefilling", "an existing record is never clobbered"


def test_records_of_a_dead_router_are_reaped(state):
    state.router_alive("r-live", ttl_s=5)
    state.router_alive("r-dead", ttl_s=0.2)
    for rid, router in (("a", "r-live"), ("b", "r-dead"), ("c", "r-dead")):
        state.create_request(rid, router=router)
    state.transition("c", "prefilling")
    state.create_request("d", router="r-dead")
    state.transition("d", "failed", error="x")
    assert state.active_requests() == {"a", "b", "c"}, "terminal records leave the active set"
    assert state.reap_orphans() == []  # r-dead is still alive
    time.sleep(0.3)
    assert state.reap_orphans() == ["b", "c"]
    assert state.request("b")["state"] == "failed" and "r-dead" in state.request("c")["error"]
    assert state.request("a")["state"] == "queued" and state.active_requests() == {"a"}


def test_async_reaper(redis_url, state):
    async def go():
        ast = AsyncClusterState.from_url(redis_url, prefix="t:")
        try:
            await ast.router_alive("gone", ttl_s=0.1)
            await ast.create_request("x", router="gone")
            await asyncio.sleep(0.2)
            return await ast.reap_orphans()
        finally:
            await ast.aclose()

    assert asyncio.run(go()) == ["x"]
    assert state.request("x")["state"] == "failed"


def test_colocated_requests_skip_transferring(state):
    state.heartbeat(WorkerInfo("c0", "colocated", "h:1"))
    assert [w.role for w in state.workers()] == ["colocated"]
    state.create_request("co1")
    state.transition("co1", "prefilling", prefill_worker="c0", decode_worker="c0")
    state.transition("co1", "decoding")  # the colocated worker's first token
    state.transition("co1", "finished", finish_reason="length")
    rec = state.request("co1")
    assert rec["state"] == "finished" and "transferring_at" not in rec
    state.create_request("co2")
    with pytest.raises(InvalidTransition):
        state.transition("co2", "decoding")  # never straight from queued


def test_workers_register_their_page_size(state):
    from dsv32_kernels.layout import PAGE_SIZE

    from dsv32_cluster.state import DEFAULT_PAGE_SIZE

    assert DEFAULT_PAGE_SIZE == PAGE_SIZE, "a registration built by hand counts pages as the engine does"
    state.register(WorkerInfo("d16", "decode", "h:1", page_size=16, total_pages=4))
    state.register(WorkerInfo("d-old", "decode", "h:2"))
    state.client.hdel(state.keys.worker("d-old"), "page_size")  # a worker from before the field
    got = {w.worker_id: w for w in state.workers()}
    assert (got["d16"].page_size, got["d16"].pages_for(17), got["d-old"].page_size) == (16, 2, DEFAULT_PAGE_SIZE)
    with pytest.raises(ValueError, match="page_size"):
        WorkerInfo("x", "decode", "h:1", page_size=0)


def test_directory_refresh_wakes_waiters(redis_url, state):
    from dsv32_cluster.directory import WorkerDirectory

    async def go():
        ast = AsyncClusterState.from_url(redis_url, prefix="t:")
        directory = WorkerDirectory(ast)
        try:
            assert not await directory.wait_changed(0.05), "nothing changed: the wait times out"
            waiters = [asyncio.ensure_future(directory.wait_changed(5)) for _ in range(3)]
            await asyncio.sleep(0.01)
            state.register(WorkerInfo("d0", "decode", "h:1"))
            await directory.refresh()
            assert await asyncio.gather(*waiters) == [True] * 3, "one refresh wakes every waiter"
            assert [w.worker_id for w in directory.snapshot] == ["d0"]
        finally:
            await directory.close()
            await ast.aclose()

    asyncio.run(go())


def test_workers_publish_their_prefix_cache_and_the_router_reads_hits(redis_url, state):
    """The heartbeat applies the allocator's publish/evict events to the worker's key set (rewriting it
    when it drifted); the router's lookup counts each worker's leading run of held pages."""
    from dsv32_cluster.heartbeat import Heartbeat, WorkerLoad
    from dsv32_engine.cache import PageAllocator
    from dsv32_text.prefix_hash import page_hashes, salt_key

    salt, prompt = salt_key("m"), list(range(1000, 1300))  # 4 full pages before the last token
    keys = page_hashes(prompt, 64, salt)
    alloc = PageAllocator(8)
    pages = alloc.allocate(3)
    for p, k in zip(pages, keys[:3]):
        alloc.publish(p, k)
    a = WorkerInfo("kv-a", "decode", "a:1", cache_salt=salt)
    b = WorkerInfo("kv-b", "decode", "b:1", cache_salt=salt)
    c = WorkerInfo("kv-c", "decode", "c:1")  # no prefix cache: not asked
    hb = Heartbeat(state, a, lambda: WorkerLoad(free_pages=8, total_pages=8), cache=alloc)
    hb.beat()
    assert state.client.scard(state.keys.worker_kv("kv-a")) == 3
    state.heartbeat(b)
    state.publish_cache_keys("kv-b", [keys[1], keys[2]], [])  # holds pages 1-2 but not 0: no leading run

    async def hits():
        s = AsyncClusterState.from_url(redis_url, prefix="t:")
        try:
            return await s.cached_prefix_tokens([a, b, c], prompt)
        finally:
            await s.aclose()
    assert asyncio.run(hits()) == {"kv-a": 192, "kv-b": 0}
    alloc.free(pages)
    alloc.evict([keys[2]])
    hb.beat()  # the eviction event
    assert asyncio.run(hits())["kv-a"] == 128
    state.client.delete(state.keys.worker_kv("kv-a"))  # lost (a Redis restart): rewritten whole
    hb.beat()
    hb.beat()
    assert state.client.scard(state.keys.worker_kv("kv-a")) == 2
    state.deregister("kv-a")
    assert not state.client.exists(state.keys.worker_kv("kv-a"))
