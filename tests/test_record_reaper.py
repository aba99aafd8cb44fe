"""Issue 10, must have 4: request records can never be left non-terminal. The reaper (run by every
router) fails an open record whose router's liveness key expired ("router <id> gone") or that has not
been updated for ``stale_after_s`` ("stale for N s"), atomically; against the real redis-server."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dsv32_cluster import state as state_module
from dsv32_cluster.state import AsyncClusterState, ClusterState


@pytest.fixture
def state(redis_url):
    st = ClusterState.from_url(redis_url, prefix="reap:")
    yield st
    st.client.close()


def _decoding(state, rid, router):
    state.create_request(rid, router=router)
    for s in ("prefilling", "transferring", "decoding"):
        state.transition(rid, s)


def _age(state, rid, seconds):
    """As if the record's last update was ``seconds`` ago."""
    state.client.hset(state.keys.request(rid), "updated_at", repr(time.time() - seconds))


def test_dead_router_and_stale_records_are_failed_live_and_finished_ones_are_not(state):
    state.router_alive("r-live", ttl_s=30)
    state.router_alive("r-dead", ttl_s=0.2)
    _decoding(state, "orphan", "r-dead")       # left decoding by a router that then died
    _decoding(state, "fresh", "r-live")        # a live router's request, updated just now
    _decoding(state, "stuck", "r-live")        # a live router's request it lost track of
    _age(state, "stuck", 1300)
    _decoding(state, "done", "r-dead")
    state.transition("done", "finished", finish_reason="length")
    done_before = state.request("done")
    assert state.reap_orphans() == ["stuck"], "r-dead is alive still; 1300 s > the default 1200 s bound"
    time.sleep(0.3)  # r-dead's liveness key expires
    assert state.reap_orphans() == ["orphan"]
    orphan, stuck = state.request("orphan"), state.request("stuck")
    assert (orphan["state"], orphan["error"]) == ("failed", "router r-dead gone")
    assert stuck["state"] == "failed" and stuck["error"].startswith("stale for 130") and stuck["error"].endswith(" s")
    assert state.request("fresh")["state"] == "decoding", "a live router's recent record is left alone"
    assert state.request("done") == done_before, "a finished record is untouched"
    assert state.active_requests() == {"fresh"}
    assert state.reap_orphans() == [], "nothing twice"


def test_the_bound_is_a_parameter(state):
    state.router_alive("r1", ttl_s=30)
    _decoding(state, "a", "r1")
    _age(state, "a", 5)
    assert state.reap_orphans(stale_after_s=60) == []
    assert state.reap_orphans(stale_after_s=2) == ["a"]
    assert state.request("a")["error"] == "stale for 5 s"


def test_a_record_that_moved_on_after_the_scan_is_left_alone(state, monkeypatch):
    """The decision is taken again inside the script: a candidate that finished, or was updated, between
    the scan and the write keeps its state."""
    state.router_alive("r1", ttl_s=30)
    for rid in ("finishes", "moves"):
        _decoding(state, rid, "r1")
        _age(state, rid, 100)
    real_candidates = state_module.reap_candidates

    def candidates_then_race(*a, **kw):
        out = real_candidates(*a, **kw)
        assert [rid for rid, _ in out[1]] == ["finishes", "moves"]
        state.transition("finishes", "finished")
        state.transition("moves", "queued")  # a retry: updated now
        return out

    monkeypatch.setattr(state_module, "reap_candidates", candidates_then_race)
    assert state.reap_orphans(stale_after_s=10) == []
    assert state.request("finishes")["state"] == "finished" and "error" not in state.request("finishes")
    assert state.request("moves")["state"] == "queued"


def test_two_routers_reaping_at_once_fail_each_record_once(redis_url, state):
    state.router_alive("gone", ttl_s=0.05)
    ids = [f"x{i}" for i in range(40)]
    for rid in ids:
        _decoding(state, rid, "gone")
    time.sleep(0.1)
    results: list[list[str]] = [[], []]

    def reap(i):
        st = ClusterState.from_url(redis_url, prefix="reap:")
        try:
            results[i] = st.reap_orphans()
        finally:
            st.client.close()

    threads = [threading.Thread(target=reap, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results[0] + results[1]) == sorted(ids), "each record failed exactly once"
    assert {state.request(r)["state"] for r in ids} == {"failed"} and not state.active_requests()


def test_async_reaper_same_rules(redis_url, state):
    state.router_alive("live", ttl_s=30)
    _decoding(state, "gone-1", "vanished")  # no liveness key at all
    _decoding(state, "old", "live")
    _age(state, "old", 50)
    _decoding(state, "new", "live")

    async def go():
        ast = AsyncClusterState.from_url(redis_url, prefix="reap:")
        try:
            return sorted(await ast.reap_orphans(stale_after_s=30))
        finally:
            await ast.aclose()

    assert asyncio.run(go()) == ["gone-1", "old"]
    assert state.request("gone-1")["error"] == "router vanished gone"
    assert state.request("old")["error"] == "stale for 50 s"
    assert state.request("new")["state"] == "decoding"
