"""Prefix caching in the engine: identical outputs, indexer keys reused (and read), eviction without leaks.

The disaggregated side (turn 2 moves only new pages, a restarted prefill worker) is in
tests/test_e2e_sessions.py; the routing policy in tests/test_router_policy.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import tiny_checkpoint
from dsv32_engine import LLM, SamplingParams
from dsv32_engine.model import DeepseekV32ForCausalLM
from dsv32_engine.cache import PageAllocator
from dsv32_text.prefix_hash import page_hashes, salt_key

PAGE = 64  # the tiny preset's page size; index_topk is 64 too, so prompts past one page exercise DSA


def _ids(out):
    return [o.outputs[0].token_ids for o in out]


def _run_turns(llm, prompts, sp):
    """One request at a time (so later ones can hit what earlier ones left), outputs in order."""
    return [_ids(llm.generate([p], sp))[0] for p in prompts]


# -- allocator ---------------------------------------------------------------------------------
def test_allocator_shares_evicts_lru_and_never_a_page_in_use():
    a = PageAllocator(4)
    pages = a.allocate(3)
    keys = ["k0", "k1", "k2"]
    for p, k in zip(pages, keys):
        assert a.publish(p, k)
    assert not a.publish(pages[0], "other") and not a.publish(a.allocate(1)[0], "k0")  # one key, one page
    a.free(pages[:2])  # k0, k1 unreferenced (cached); k2 still in use
    assert a.num_free == 2 and a.num_cached == 3
    assert a.lookup(keys) == pages and a.lookup(["nope", "k1"]) == []  # longest prefix only
    a.acquire(a.lookup(["k0"]))  # shared again
    got = a.allocate(1)  # the only evictable page is k1's (k0 is referenced again, k2 in use)
    assert got == [pages[1]] and a.lookup(keys) == pages[:1] and a.evictions == 1
    with pytest.raises(Exception):
        a.allocate(1)
    a.free([pages[0], pages[2]] + got)
    a.free([p for p in range(4) if p not in pages])
    a.check_no_leaks()  # cached but unreferenced pages count as free
    added, removed = a.drain_events()
    assert added == {"k0", "k2"} and removed == {"k1"}
    assert a.evict() == 2 and a.num_cached == 0 and a.num_free == 4


def test_page_hashes_chain_and_salt():
    toks = list(range(300))
    h = page_hashes(toks, PAGE, salt_key("m"))
    assert len(h) == 4 and len(set(h)) == 4
    assert page_hashes(toks[:200], PAGE, salt_key("m")) == h[:3]  # a prefix's keys are a prefix
    assert page_hashes(toks, PAGE, salt_key("m"), h[:2]) == h  # extended, not recomputed
    other = toks[:10] + [7] + toks[11:]
    assert page_hashes(other, PAGE, salt_key("m"))[0] != h[0]  # a token in page 0 changes every key
    assert page_hashes(toks, PAGE, salt_key("other model"))[0] != h[0]


# -- identity ----------------------------------------------------------------------------------
def _workloads(seed: int = 0):
    r = random.Random(seed)
    system = [r.randrange(100, 8000) for _ in range(150)]
    shared = [system + [r.randrange(100, 8000) for _ in range(n)] for n in (10, 40, 90)]
    diverge = [system[:100] + [r.randrange(100, 8000) for _ in range(60)] for _ in range(2)]  # inside page 1
    short = [system[:40] + [5], system[:40] + [6]]  # shorter than index_topk: no indexer at all
    exact_repeat = [system, system]  # the second run hits every full page
    return {"shared": shared, "diverge": diverge, "short": short, "repeat": exact_repeat}


@pytest.mark.parametrize("numerics", ["exact", "fp8"])
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_outputs_with_caching_equal_outputs_without(numerics, sampling):
    ckpt = tiny_checkpoint("bf16", seed=0)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True) if sampling == "greedy" else \
        SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=6, ignore_eos=True)
    on, off = LLM(ckpt, numerics=numerics, num_pages=48), LLM(ckpt, numerics=numerics, num_pages=48,
                                                                prefix_caching=False)
    for name, prompts in _workloads().items():
        assert _run_turns(on, prompts, sp) == _run_turns(off, prompts, sp), name
    # a multi-turn session: each turn's prompt is the last prompt + its answer + a new user message
    r, prompt = random.Random(1), [r_ for r_ in range(200, 330)]
    for turn in range(3):
        a, b = on.generate([prompt], sp)[0], off.generate([prompt], sp)[0]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, turn
        if turn:
            assert a.num_cached_tokens >= PAGE * ((len(prompt) - 20) // PAGE)  # the history was reused
        prompt = prompt + list(a.outputs[0].token_ids) + [r.randrange(100, 8000) for _ in range(30)]
    assert on.engine.stats["cached_tokens"] > 0 and off.engine.stats["cached_tokens"] == 0
    assert on.engine.stats["prefill_tokens"] < off.engine.stats["prefill_tokens"]
    on.engine.allocator.check_no_leaks()


def test_a_request_can_opt_out():
    llm = LLM(tiny_checkpoint("bf16", seed=0), num_pages=32)
    p = list(range(1000, 1200))
    llm.generate([p], SamplingParams(temperature=0, max_tokens=2))
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=2, skip_prefix_cache=True))[0]
    assert out.num_cached_tokens == 0
    assert llm.generate([p], SamplingParams(temperature=0, max_tokens=2))[0].num_cached_tokens == 3 * PAGE


# -- the indexer keys are reused, and read -------------------------------------------------------
def _record_selections(monkeypatch) -> list:
    """(layer, context length, selected positions) of every decode step's attention (ForwardBatch.record_topk)."""
    seen = []
    real = DeepseekV32ForCausalLM.forward

    def spy(self, batch, cache):
        batch.record_topk = rec = []
        out = real(self, batch, cache)
        for layer, span, visible in rec:
            if visible.shape[0] == 1:  # decode steps: one query
                seen.append((layer, span.context_len, frozenset(visible[0].nonzero().flatten().tolist())))
        return out
    monkeypatch.setattr(DeepseekV32ForCausalLM, "forward", spy)
    return seen


def test_cached_prefix_selects_the_same_topk_as_an_uncached_run(monkeypatch):
    ckpt = tiny_checkpoint("bf16", seed=0)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompt = [random.Random(3).randrange(100, 8000) for _ in range(230)]  # 3 full pages cached, topk 64
    seen = _record_selections(monkeypatch)
    on = LLM(ckpt, num_pages=32)
    on.generate([prompt], sp)  # fills the cache
    seen.clear()
    cached = on.generate([prompt], sp)[0]
    assert cached.num_cached_tokens == 3 * PAGE
    with_cache = list(seen)
    seen.clear()
    plain = LLM(ckpt, num_pages=32, prefix_caching=False).generate([prompt], sp)[0]
    assert cached.outputs[0].token_ids == plain.outputs[0].token_ids
    assert with_cache and with_cache == seen  # every decode step, every layer: the same top-k set
    assert all(len(sel) == 64 for _, n, sel in seen if n > 64)  # DSA really selected (index_topk = 64)


def test_poisoned_cached_indexer_pages_change_the_output():
    """Only the cached pages' indexer keys are overwritten: if the reuse path did not read them (or
    recomputed them), the output could not change."""
    ckpt = tiny_checkpoint("bf16", seed=0)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = [random.Random(4).randrange(100, 8000) for _ in range(230)]
    llm = LLM(ckpt, num_pages=32)
    clean = llm.generate([prompt], sp)[0]
    assert llm.generate([prompt], sp)[0].outputs[0].token_ids == clean.outputs[0].token_ids
    eng = llm.engine
    pages = eng.allocator.lookup(page_hashes(prompt[:3 * PAGE], PAGE, eng.cache_salt))
    assert len(pages) == 3
    g = torch.Generator().manual_seed(0)
    for pool in eng.cache.index:
        noise = torch.randint(0, 255, pool[pages].shape, generator=g, dtype=torch.uint8)
        pool[pages] = noise.view(pool.dtype) if pool.dtype.itemsize == 1 else pool[pages] * 0 + \
            torch.randn(pool[pages].shape, generator=g, dtype=torch.float32).to(pool.dtype) * 50
    poisoned = llm.generate([prompt], sp)[0]
    assert poisoned.num_cached_tokens == 3 * PAGE
    assert poisoned.outputs[0].token_ids != clean.outputs[0].token_ids


# -- eviction under pressure -------------------------------------------------------------------
def test_many_sessions_on_a_small_pool_evict_without_leaks_or_harm():
    ckpt = tiny_checkpoint("bf16", seed=0)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    r = random.Random(5)
    system = [r.randrange(100, 8000) for _ in range(128)]
    sessions = [system + [r.randrange(100, 8000) for _ in range(150)] for _ in range(6)]
    # 6 sessions x 3 own full pages + 2 shared do not fit in 10 pages: LRU eviction
    on = LLM(ckpt, num_pages=10, max_num_seqs=2)
    off = LLM(ckpt, num_pages=10, max_num_seqs=2, prefix_caching=False)
    alloc = on.engine.allocator
    real_allocate = alloc.allocate

    def checked_allocate(n):  # a page handed out must never be one a running request holds
        held = {p for req in on.engine.scheduler.running for p in req.pages}
        got = real_allocate(n)
        assert not held & set(got)
        return got
    alloc.allocate = checked_allocate
    for turn in range(2):
        outs_on = _ids(on.generate(sessions, sp))  # batched: sessions compete for pages
        assert outs_on == _ids(off.generate(sessions, sp)), turn
        sessions = [s + o + [r.randrange(100, 8000) for _ in range(10)] for s, o in zip(sessions, outs_on)]
    assert alloc.evictions > 0 and on.engine.stats["cached_tokens"] > 0
    alloc.check_no_leaks()
    alloc.evict()
    assert alloc.num_cached == 0 and alloc.num_free == alloc.num_total


def test_session_pages_free_what_only_that_session_used_on_end_or_ttl():
    from types import SimpleNamespace

    from dsv32_engine.prefix_cache import SessionPages

    a = PageAllocator(6)
    pages = a.allocate(4)
    for p, k in zip(pages, ["sys", "a1", "b1", "b2"]):
        a.publish(p, k)
    a.free(pages)  # all cached, unreferenced
    keys = {1: "sys", 2: "a1", 3: "b1", 4: "b2"}  # a one-token "page" per key, for the test
    s = SessionPages(SimpleNamespace(allocator=a, page_keys=lambda ids: [keys[i] for i in ids]), None, ttl_s=10)
    s.note("A", [1, 2], now=0)
    s.note("B", [1, 3, 4], now=5)
    assert s.release("B") == 2 and a.lookup(["sys"]) and not a.lookup(["b1"])  # sys is A's too
    a.acquire(a.lookup(["sys"]))  # in use: even its last session ending cannot evict it
    assert s.expire(now=9) == 0 and s.expire(now=11) == 1  # A's a1; sys is referenced
    assert a.lookup(["sys"]) and not a.lookup(["a1"]) and len(s) == 0
    assert s.release("unknown") == 0
