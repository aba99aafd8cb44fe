"""The pair-selection policy, as a pure function of the registry snapshot."""

from __future__ import annotations

import pytest

from dsv32_router.policy import NeverFits, NoCapacity, NoWorkers, PairPolicy
from dsv32_cluster.state import WorkerInfo

PAGE = 64  # tokens per page, as the workers below register it


def D(wid, free=100, total=100, running=0, page_size=PAGE):
    return WorkerInfo(wid, "decode", f"{wid}:1", free_pages=free, total_pages=total, running=running,
                      page_size=page_size)


def P(wid, queued=0, total=100, page_size=PAGE):
    return WorkerInfo(wid, "prefill", f"{wid}:1", queued_tokens=queued, total_pages=total, page_size=page_size)


def test_no_workers_of_a_role():
    pol = PairPolicy()
    with pytest.raises(NoWorkers):
        pol.choose_decode([P("p")], 10)
    with pytest.raises(NoWorkers):
        pol.choose_prefill([D("d")], 10)


def test_decode_needs_room_for_prompt_plus_max_tokens():
    pol = PairPolicy()
    assert pol.choose_decode([D("a", free=1), D("b", free=2)], 65).worker_id == "b"
    with pytest.raises(NoCapacity) as e:
        pol.choose_decode([D("a", free=1), D("b", free=1)], 65)
    assert not isinstance(e.value, NeverFits)
    with pytest.raises(NeverFits):
        pol.choose_decode([D("a", free=1, total=2)], 64 * 3)


def test_least_loaded_then_most_free_then_rotation():
    pol = PairPolicy()
    assert pol.choose_decode([D("a", running=3), D("b", running=1)], 1).worker_id == "b"
    assert pol.choose_decode([D("a", free=50), D("b", free=90)], 1).worker_id == "b"
    picks = [pol.choose_decode([D("a"), D("b"), D("c")], 1).worker_id for _ in range(6)]
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"], "equal workers take turns"


def test_pending_load_spreads_a_burst():
    pol = PairPolicy()
    workers = [D("a"), D("b"), P("p"), P("q")]
    ds, ps = [], []
    for _ in range(4):  # nothing finishes: the reports stay stale, the router's own books do not
        d, p = pol.choose_decode(workers, 10), pol.choose_prefill(workers, 10)
        pol.add(d.worker_id, requests=1, pages=1)
        pol.add(p.worker_id, tokens=10)
        ds.append(d.worker_id)
        ps.append(p.worker_id)
    assert sorted(ds) == ["a", "a", "b", "b"] and sorted(ps) == ["p", "p", "q", "q"]
    pol.remove("a", requests=2, pages=2)
    assert pol.pending["a"].requests == 0


def test_session_affinity_unless_full_or_failed():
    pol = PairPolicy()
    ws = [D("a"), D("b", running=5)]
    assert pol.choose_decode(ws, 10, affinity="b").worker_id == "b"
    assert pol.choose_decode([D("a"), D("b", free=0)], 10, affinity="b").worker_id == "a"
    assert pol.choose_decode(ws, 10, affinity="b", avoid=frozenset({"b"})).worker_id == "a"


def test_failed_workers_are_avoided_but_still_used_as_a_last_resort():
    pol = PairPolicy()
    assert pol.choose_decode([D("a"), D("b", running=9)], 1, avoid=frozenset({"a"})).worker_id == "b"
    assert pol.choose_decode([D("a")], 1, avoid=frozenset({"a"})).worker_id == "a"
    assert pol.choose_prefill([P("p"), P("q", queued=999)], 1, avoid=frozenset({"p"})).worker_id == "q"
    assert pol.choose_prefill([P("p")], 1, avoid=frozenset({"p"})).worker_id == "p"


def test_prefill_fewest_queued_tokens_and_pool_size():
    pol = PairPolicy()
    assert pol.choose_prefill([P("p", queued=500), P("q", queued=100)], 10).worker_id == "q"
    assert pol.choose_prefill([P("p", total=1), P("q", queued=999, total=10)], 200).worker_id == "q"
    with pytest.raises(NeverFits):
        pol.choose_prefill([P("p", total=1)], 200)


def test_colocated_workers_are_chosen_by_the_decode_rules_and_never_mixed_with_pairs():
    pol = PairPolicy()
    C = [WorkerInfo(w, "colocated", f"{w}:1", free_pages=f, total_pages=100, running=r, page_size=PAGE)
         for w, f, r in (("c0", 100, 2), ("c1", 100, 0), ("c2", 1, 0))]
    assert pol.choose_decode(C + [D("d")], 65, role="colocated").worker_id == "c1"
    assert pol.choose_decode(C + [D("d")], 65).worker_id == "d", "a colocated worker is no decode worker"
    with pytest.raises(NoWorkers, match="no colocated worker"):
        pol.choose_decode([D("d"), P("p")], 10, role="colocated")
    with pytest.raises(NeverFits, match="largest colocated pool"):
        pol.choose_decode(C, 64 * 101, role="colocated")


def test_pages_are_counted_in_each_workers_registered_page_size():
    pol = PairPolicy()
    # 100 tokens: 2 pages of 64 tokens, 7 of 16
    assert pol.choose_decode([D("a", free=2, page_size=16), D("b", free=2)], 100).worker_id == "b"
    assert pol.choose_decode([D("a", free=7, page_size=16), D("b", free=1)], 100).worker_id == "a"
    with pytest.raises(NeverFits, match="needs 7 cache pages"):
        pol.choose_decode([D("a", free=6, total=6, page_size=16)], 100)
    assert pol.choose_prefill([P("p", total=6, page_size=16), P("q", queued=999, total=2)], 100).worker_id == "q"
    with pytest.raises(NeverFits, match="needs 7 or 13 cache pages"):
        pol.choose_prefill([P("p", total=6, page_size=16), P("q", total=12, page_size=8)], 100)


# -- cache-aware choice ----------------------------------------------------------------------
def test_decode_goes_where_the_prompt_is_cached_unless_that_worker_is_overloaded():
    pol = PairPolicy(cache_slack=4)
    ws = [D("a", running=3), D("b", running=1), D("c", running=0)]
    assert pol.choose_decode(ws, 100).worker_id == "c"  # nothing cached: least loaded
    assert pol.choose_decode(ws, 100, cached={"a": 640, "b": 128}).worker_id == "a"  # longest prefix wins
    assert pol.choose_decode(ws, 100, cached={"a": 640, "b": 640}).worker_id == "b"  # equal hits: less load
    busy = [D("a", running=5), D("b", running=1), D("c", running=0)]
    assert pol.choose_decode(busy, 100, cached={"a": 640, "b": 128}).worker_id == "b"  # a is 5 above c: b
    assert pol.choose_decode(busy, 100, cached={"a": 640}).worker_id == "c"  # no cached worker near: load
    # this router's own in-flight requests count as load too
    pol.add("a", requests=2)
    assert pol.choose_decode(ws, 100, cached={"a": 640}).worker_id == "c"
    pol.remove("a", requests=2)
    # the cache never overrides capacity or a worker that failed the request
    assert pol.choose_decode([D("a", free=1), D("b")], 100, cached={"a": 64}).worker_id == "b"
    assert pol.choose_decode(ws, 100, cached={"a": 640}, avoid=frozenset({"a"})).worker_id == "c"


def test_cache_beats_session_affinity_and_affinity_beats_load():
    pol = PairPolicy()
    ws = [D("a", running=1), D("b", running=2)]
    assert pol.choose_decode(ws, 100, affinity="b").worker_id == "b"
    assert pol.choose_decode(ws, 100, affinity="b", cached={"a": 64}).worker_id == "a"


def test_prefill_counts_the_tokens_it_would_compute():
    pol = PairPolicy()
    ws = [P("a", queued=300), P("b", queued=0)]
    assert pol.choose_prefill(ws, 1000).worker_id == "b"
    # a holds 960 of the 1000 tokens: 300 queued + 40 to compute < 0 + 1000
    assert pol.choose_prefill(ws, 1000, cached={"a": 960}).worker_id == "a"
    assert pol.choose_prefill(ws, 1000, cached={"a": 512}).worker_id == "a"  # 300 + 488 < 1000
    assert pol.choose_prefill(ws, 1000, cached={"a": 128}).worker_id == "b"  # 300 + 872 > 1000
