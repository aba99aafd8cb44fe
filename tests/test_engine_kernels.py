"""The engine's kernel attention path (``attention_kernels.py``) against its torch path.

Chain of agreements (issue 3): oracle (``transformers``, test_engine_oracle.py) → engine
torch path → kernels' naive twins (here) → Triton kernels (test_kernels_*.py, and the
whole engine under the interpreter here).

1. Link engine → naive: the twins, fed pools filled by the engine's own ``paged``
   writers, compute what the engine's unpaged math computes (``Indexer.scores``,
   ``TorchAttention._decode``, ``_prefill``), and ``naive_store_kv`` writes the engine's bytes.
2. Layer replay: each layer's attention, fed the same hidden states (captured from a
   torch-path run), gives the same cache bytes, the same top-k sets and the same
   output through either path, in both numerics modes, prefill and decode.
3. Whole engine: greedy tokens (and log-probs) are the same with
   ``attention_backend="kernels"`` (torch twins, in process) and with the forced Triton
   kernels under the interpreter (a subprocess: ``TRITON_INTERPRET=1`` must precede the
   first ``import triton``, and ``transformers`` imports it in a full run) as on the torch
   path.

The tie trap: both paths compute the indexer scores in a different
order (the ``head_dim^-0.5`` factor is folded into the head weights on the kernel path),
so a top-k cut-off closer than float rounding may be decided differently, and neither is
wrong. Prompts whose cut-off gap is under ``MIN_REL_GAP`` anywhere are replaced by the
next seed (reported); the comparison is never loosened.

fp8 numerics and long prompts: whole-engine greedy tokens are **not** compared there.
The two paths' layer outputs differ by float rounding (~1e-6 relative: absorbed vs
expanded prefill, another summation order), and FP8 rounding of the next layer's
latent and indexer q/k turns that into occasional one-e4m3-ulp jumps, which move the
top-k sets, which the random tiny model amplifies into different tokens. This is a
property of the numerics mode, not of either path: the torch path alone, with its
``o_proj`` weights perturbed by 2^-20 relative, changes the greedy tokens of such
prompts as often (measured while writing this test: 3 of 12 prompts of 100-200 tokens,
against 2 of 12 for the kernel path). What is well defined — and checked here — is the
layer replay (2.) in fp8 mode and the whole engine on prompts shorter than ``index_topk``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from checkpoints import tiny_checkpoint
from dsv32_kernels import fp8
from dsv32_engine import paged
from dsv32_engine.attention_kernels import KernelAttention
from dsv32_engine.cache import KVCache
from dsv32_engine.config import ModelConfig
from dsv32_kernels.layout import CacheLayout
from dsv32_engine.model import DeepseekV32ForCausalLM, ForwardBatch, SeqSpan
from dsv32_engine.rope import Rotary
from dsv32_engine.weights import load_weights

MIN_REL_GAP = 1e-5  # same policy as the oracle test: fp32 paths differ by ~1e-6 relative
NEW_TOKENS = 8
SHORT, LONG = 40, 100  # tiny: index_topk = 64; 40 + 8 stays below it, 100 exceeds it from the first step
U32 = 2.0 ** -24


def _load(ckpt: str, mode: str, attention_backend: str = "torch"):
    cfg = ModelConfig.from_dir(ckpt)
    layout = CacheLayout(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim or 128, mode=mode,
                         dtype=torch.float32)
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg, layout, attention_backend)
    load_weights(model, cfg, ckpt, torch.float32)
    return model.eval(), cfg, layout


@pytest.fixture(scope="module")
def ckpt() -> str:
    return tiny_checkpoint("fp32", seed=1)


@pytest.fixture(scope="module")
def v3_ckpt(ckpt, tmp_path_factory) -> str:
    """The same weights as a ``deepseek_v3`` checkpoint: no indexer (dense MLA)."""
    from checkpoints import as_deepseek_v3

    return as_deepseek_v3(ckpt, tmp_path_factory.mktemp("v3") / "ckpt")


@pytest.fixture(scope="module", params=["exact", "fp8"])
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def loaded(ckpt, mode):
    return _load(ckpt, mode)


# -- 1. engine unpaged math → naive twins ------------------------------------------------------------------
def _project(mla, x, positions):
    """Everything a layer computes before it stores and attends (``MLA.project``)."""
    cos, sin = Rotary(mla.cfg).cos_sin(positions, x.dtype)
    p = mla.project(x, cos, sin)
    return SimpleNamespace(q_nope=p.q_nope, q_pe=p.q_pe, c=p.c, k_pe=p.k_pe, iq=p.index_q, iw=p.index_w, ik=p.index_k)


def _requests(mla, layout, cfg, lens, seed):
    """Requests of the given lengths on scattered pages, their tokens projected by ``mla`` and cached by ``paged``."""
    g = torch.Generator().manual_seed(seed)
    need = [layout.pages_for(n) for n in lens]
    order = torch.randperm(sum(need) + 3, generator=g)
    cache = KVCache(layout, cfg.num_hidden_layers, sum(need) + 3)
    reqs, used = [], 0
    for n, k in zip(lens, need):
        table = order[used:used + k].clone()
        used += k
        x = torch.randn(n, cfg.hidden_size, generator=g)
        pos = torch.arange(n)
        p = _project(mla, x, pos)
        slots = paged.slots_for(table, pos, layout.page_size)
        paged.store_latent(cache.latent[mla.layer], slots, p.c, p.k_pe, layout)
        paged.store_index_key(cache.index[mla.layer], slots, p.ik, layout)
        reqs.append(SimpleNamespace(n=n, table=table, slots=slots, p=p))
    return cache, reqs


def _absorbed_q(mla, q_nope, q_pe):
    w = mla.kv_b_proj.weight.view(mla.n_heads, mla.nope + mla.v_dim, mla.rank)
    return torch.cat([torch.einsum("thd,hdc->thc", q_nope, w[:, :mla.nope]), q_pe], dim=-1), w[:, mla.nope:]


def _kernel_index_q(layout, iq, iw, mla):
    """The indexer query as the kernels take it (what ``KernelAttention`` passes)."""
    if layout.mode == "fp8":
        q8, s = fp8.quant_blocks(iq)
        return q8, s[..., 0], iw * mla.indexer.head_dim ** -0.5
    return iq, None, iw * mla.indexer.head_dim ** -0.5


def _score_bound(iq, iw, keys, H):
    """fp32 error bound of one index score computed in two orders (Higham §3.1): each of the
    ``H·D`` products and the weight fold is one rounding, the sums at most ``γ_{H+D}`` each way;
    twice that for the difference of two such computations."""
    terms = torch.einsum("nhd,nld->nhl", iq.abs(), keys.abs())
    return 2 * (H + iq.shape[-1] + 2) * U32 * torch.einsum("nhl,nh->nl", terms, iw.abs())


def _cut_gap(scores: torch.Tensor, k: int) -> float:
    """Smallest relative gap between the k-th and (k+1)-th finite score over the rows that have more than k."""
    top = scores.topk(k + 1, dim=-1).values
    ok = torch.isfinite(top[:, k])
    if not ok.any():
        return float("inf")
    return ((top[:, k - 1] - top[:, k]).abs() / top[:, k - 1].abs().clamp_min(1e-30))[ok].min().item()


def test_pack_latent_accepts_empty_input():
    """A step that writes no token (all slots -1, or an empty batch) packs nothing: no error."""
    for rank in (128, 512):  # one fp8 tile: the [0, 1] scale tensor whose byte view used to fail
        layout = CacheLayout(rank, 64, 128, mode="fp8")
        for lead in ((0,), (3, 0)):
            rec = fp8.pack_latent(torch.zeros(*lead, rank), torch.zeros(*lead, 64), layout)
            assert rec.shape == (*lead, layout.latent_token_bytes) and rec.dtype == torch.uint8
            assert fp8.unpack_latent(rec, layout).shape == (*lead, layout.latent_dim)


def test_naive_store_kv_writes_the_engines_bytes(loaded):
    import dsv32_kernels as K

    model, cfg, layout = loaded
    g = torch.Generator().manual_seed(0)
    T, P = 150, 4
    c, k_pe, ik = (torch.randn(T, d, generator=g) for d in (layout.kv_lora_rank, layout.qk_rope_head_dim,
                                                            layout.index_head_dim))
    slots = torch.randperm(P * layout.page_size, generator=g)[:T]
    slots[7] = -1  # skipped by the kernel op; the engine has no such slot, so write it nowhere on both sides
    a = KVCache(layout, 1, P)
    keep = slots >= 0
    paged.store_latent(a.latent[0], slots[keep], c[keep], k_pe[keep], layout)
    paged.store_index_key(a.index[0], slots[keep], ik[keep], layout)
    b = KVCache(layout, 1, P)
    K.naive_store_kv(b.latent[0], b.index[0], c, k_pe, ik, slots, layout)
    assert torch.equal(a.latent[0].view(torch.uint8), b.latent[0].view(torch.uint8))
    assert torch.equal(a.index[0].view(torch.uint8), b.index[0].view(torch.uint8))
    # deepseek_v3: no indexer key, no index pool — the latent alone
    v3 = KVCache(layout, 1, P, with_index=False)
    K.naive_store_kv(v3.latent[0], None, c, k_pe, None, slots, layout)
    assert torch.equal(v3.latent[0].view(torch.uint8), a.latent[0].view(torch.uint8))
    K.store_kv(v3.latent[0], None, c[:0], k_pe[:0], None, slots[:0], layout)  # empty step: a no-op


def test_naive_decode_chain_equals_engine_decode(loaded):
    """Batched decode (contexts below, at and above index_topk, across pages): the twins' indexer
    logits equal ``Indexer.scores``, their top-k equals the engine's, and ``naive_sparse_mla_decode``
    over those slots, mapped through W_UV, equals ``TorchAttention._decode``."""
    import dsv32_kernels as K

    model, cfg, layout = loaded
    mla, topk = model.model.layers[1].self_attn, cfg.index_topk
    lens = [30, topk, topk + 37, 150]
    with torch.inference_mode():
        cache, reqs = _requests(mla, layout, cfg, lens, seed=1)
        last = [r.n - 1 for r in reqs]
        pick = lambda name: torch.stack([getattr(r.p, name)[i] for r, i in zip(reqs, last)])  # noqa: E731
        q_nope, q_pe, iq, iw = pick("q_nope"), pick("q_pe"), pick("iq"), pick("iw")
        seqs = [SeqSpan(b, 1, r.n, r.table) for b, r in enumerate(reqs)]
        rec: list = []
        out_engine = mla.attention._decode(q_nope, q_pe, (iq, iw), seqs, cache, SimpleNamespace(record_topk=rec))

        tables = torch.nn.utils.rnn.pad_sequence([r.table for r in reqs], batch_first=True, padding_value=-1).int()
        ctx = torch.tensor(lens, dtype=torch.int32)
        q8, qs, w = _kernel_index_q(layout, iq, iw, mla)
        logits = K.naive_indexer_logits_decode(q8[:, None], w[:, None], cache.index[1], tables, ctx, layout,
                                               None if qs is None else qs[:, None], max_ctx=max(lens))[:, 0]
        logical, physical = K.naive_topk_indices(logits, topk, tables)
        for b, r in enumerate(reqs):
            keys = paged.read_index_keys(cache.index[1], r.slots, layout)
            ref = mla.indexer.scores(iq[b:b + 1], iw[b:b + 1], keys)[0]
            assert torch.isinf(logits[b, r.n:]).all() and (logits[b, r.n:] < 0).all()
            err = (logits[b, :r.n] - ref).abs()
            assert (err <= _score_bound(iq[b:b + 1], iw[b:b + 1], keys[None], iq.shape[1])[0]).all(), err.max()
            if r.n > topk:
                assert _cut_gap(ref[None], topk) >= MIN_REL_GAP  # the seed has no near-tie (else: change it)
            chosen = set(logical[b][logical[b] >= 0].tolist())
            layer, span, vis = rec[b]
            assert chosen == set(vis[0].nonzero().flatten().tolist()), f"request {b}: top-k sets differ"
            assert len(chosen) == min(r.n, topk)
            assert set(physical[b][physical[b] >= 0].tolist()) == set(r.slots[sorted(chosen)].tolist())

        q_abs, w_uv = _absorbed_q(mla, q_nope, q_pe)
        o_lat, lse = K.naive_sparse_mla_decode(q_abs, cache.latent[1], physical, mla.scale, layout)
        out_naive = torch.einsum("bhc,hdc->bhd", o_lat, w_uv)
    # same sums in another order (fp32): errors ~ n·u·Σ|terms| with n ≤ 576 + 150 and |terms| = O(|o|)
    torch.testing.assert_close(out_naive, out_engine, rtol=1e-4, atol=1e-4 * out_engine.abs().max().item())
    assert torch.isfinite(lse).all()


def test_naive_prefill_chain_equals_engine_prefill(loaded):
    """Chunked prefill (40 new tokens after 110 cached): ``naive_indexer_logits_prefill`` equals the
    engine's causal index scores, the top-k sets are the engine's, and ``naive_sparse_mla_prefill`` in
    the absorbed form equals ``TorchAttention._prefill``'s expanded MHA."""
    import dsv32_kernels as K

    model, cfg, layout = loaded
    mla, topk = model.model.layers[2].self_attn, cfg.index_topk
    L, n = 150, 40
    with torch.inference_mode():
        cache, (r,) = _requests(mla, layout, cfg, [L], seed=2)
        new = slice(L - n, L)
        p = r.p
        span = SeqSpan(0, n, L, r.table)
        rec: list = []
        out_engine = mla.attention._prefill(p.q_nope[new], p.q_pe[new], (p.iq[new], p.iw[new]), span, cache,
                                            SimpleNamespace(record_topk=rec, query_block=None))
        visible = rec[0][2]
        # attention in query blocks (what EngineCore.prefill does for long prompts) changes nothing
        rec_blocks: list = []
        blocked = mla.attention._prefill(p.q_nope[new], p.q_pe[new], (p.iq[new], p.iw[new]), span, cache,
                                         SimpleNamespace(record_topk=rec_blocks, query_block=7))
        assert torch.equal(rec_blocks[0][2], visible)
        assert (blocked - out_engine).abs().max() <= 1e-5  # only the fp32 summation order of the GEMMs differs

        q8, qs, w = _kernel_index_q(layout, p.iq[new], p.iw[new], mla)
        if layout.mode == "fp8":
            keys8, scales = fp8.index_page_views(cache.index[2], layout)
            k, k_scale = keys8[r.slots // 64, r.slots % 64], scales[r.slots // 64, r.slots % 64]
        else:
            k, k_scale = cache.index[2][r.slots // 64, r.slots % 64], None
        pos = torch.arange(L - n, L)
        logits = K.naive_indexer_logits_prefill(q8, w, k, k_scale, torch.zeros(n, dtype=torch.int32),
                                                (pos + 1).int(), qs)
        keys = paged.read_index_keys(cache.index[2], r.slots, layout)
        ref = mla.indexer.scores(p.iq[new], p.iw[new], keys)
        causal = torch.arange(L)[None, :] <= pos[:, None]
        assert torch.isinf(logits[~causal]).all()
        err = (logits - ref).abs()[causal]
        assert (err <= _score_bound(p.iq[new], p.iw[new], keys[None].expand(n, -1, -1), p.iq.shape[1])[causal]).all()
        assert _cut_gap(ref.masked_fill(~causal, float("-inf")), topk) >= MIN_REL_GAP
        logical, physical = K.naive_topk_indices(logits, topk, r.table[None].int())
        mine = torch.zeros(n, L + 1, dtype=torch.bool).scatter_(1, torch.where(logical >= 0, logical.long(), L), True)
        assert torch.equal(mine[:, :L], visible), "top-k sets differ"
        assert visible.sum(-1).tolist() == [min(int(q) + 1, topk) for q in pos]

        q_abs, w_uv = _absorbed_q(mla, p.q_nope[new], p.q_pe[new])
        o_lat, _ = K.naive_sparse_mla_prefill(q_abs, cache.latent[2], physical, mla.scale, layout)
        out_naive = torch.einsum("thc,hdc->thd", o_lat, w_uv)
    # absorbed (576-d scores, 512-d output then W_UV) vs expanded (192-d scores, 128-d v): the same
    # sums in another association, fp32: ~ (576 + 512)·u relative to Σ|terms| = O(|o|)
    torch.testing.assert_close(out_naive, out_engine, rtol=1e-4, atol=1e-4 * out_engine.abs().max().item())


# -- 2. layer replay: the same hidden states through both attention paths --------------------------------------
@pytest.mark.parametrize("kind", ["v32", "v3"])
def test_layer_replay_same_bytes_same_topk_same_output(kind, mode, ckpt, v3_ckpt):
    """Every layer's attention inputs from a torch-path run (prefill of 150 tokens in two chunks, with a
    second request of 30 tokens, then decode steps that batch both requests) are replayed through the torch
    path and the kernel path on fresh caches: the caches hold the same bytes, the top-k sets are the same,
    the outputs agree to fp32 rounding. Both numerics modes (this is where fp8 mode is compared
    closely), with the indexer (v32) and without (v3: every causal position, latent-only store). The two
    paths are two models built from the same checkpoint, one per ``attention_backend``."""
    model, cfg, layout = _load(ckpt if kind == "v32" else v3_ckpt, mode, "torch")
    models = {"torch": model, "kernels": _load(ckpt if kind == "v32" else v3_ckpt, mode, "kernels")[0]}
    assert cfg.has_indexer == (kind == "v32")
    g = torch.Generator().manual_seed(7)
    a_ids = torch.randint(100, 120000, (153,), generator=g).tolist()
    b_ids = torch.randint(100, 120000, (33,), generator=g).tolist()
    ta, tb = torch.tensor([3, 0, 5]), torch.tensor([1])
    steps = [  # (tokens of a, start of a, tokens of b, start of b)
        (a_ids[:100], 0, b_ids[:30], 0), (a_ids[100:150], 100, None, None),
        (a_ids[150:151], 150, b_ids[30:31], 30), (a_ids[151:152], 151, b_ids[31:32], 31),
    ]
    calls = []  # per forward: per layer (x, cos, sin, batch)
    hooks = [layer.self_attn.register_forward_hook(lambda m, i, o: calls.append((m.layer, i[:4])))
             for layer in model.model.layers]
    cache = KVCache(layout, cfg.num_hidden_layers, 6, with_index=cfg.has_indexer)
    try:
        for ids_a, sa, ids_b, sb in steps:
            seqs, ids, pos, slots = [], [], [], []
            for toks, start, table in ((ids_a, sa, ta), (ids_b, sb, tb)):
                if toks is None:
                    continue
                p = torch.arange(start, start + len(toks))
                seqs.append(SeqSpan(len(ids), len(toks), start + len(toks), table))
                ids += toks
                pos.append(p)
                slots.append(table[p // 64] * 64 + p % 64)
            batch = ForwardBatch(torch.tensor(ids), torch.cat(pos), torch.cat(slots), seqs,
                                 torch.tensor([len(ids) - 1]))
            model(batch, cache)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == len(steps) * cfg.num_hidden_layers
    for layer in range(cfg.num_hidden_layers):
        caches = {p: KVCache(layout, cfg.num_hidden_layers, 6, with_index=cfg.has_indexer)
                  for p in ("torch", "kernels")}
        for lay, (x, cos, sin, batch) in calls:
            if lay != layer:
                continue
            outs, recs = {}, {}
            for path in ("torch", "kernels"):
                rec: list = []
                b = ForwardBatch(batch.input_ids, batch.positions, batch.slot_mapping, batch.seqs,
                                 batch.logits_indices, record_topk=rec)
                with torch.inference_mode():
                    outs[path] = models[path].model.layers[layer].self_attn(x, cos, sin, b, caches[path])
                recs[path] = rec
            for p in ("latent", "index"):
                assert torch.equal(getattr(caches["torch"], p)[layer].view(torch.uint8),
                                   getattr(caches["kernels"], p)[layer].view(torch.uint8)), f"layer {layer}: {p} bytes"
            shapes = {p: [(s.start, v.shape) for _, s, v in recs[p]] for p in recs}
            assert shapes["torch"] == shapes["kernels"] and shapes["torch"]
            for (_, s, v1), (_, _, v2) in zip(recs["torch"], recs["kernels"]):
                assert torch.equal(v1, v2), f"layer {layer}, sequence at {s.start}: top-k sets differ"
            ref = outs["torch"]
            torch.testing.assert_close(outs["kernels"], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# -- 3. the whole engine --------------------------------------------------------------------------------------
def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(100, 120000, (length,), generator=torch.Generator().manual_seed(1000 * length + seed)).tolist()


def _generate(llm, prompts):
    from dsv32_engine import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0))
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def _generate_with_gap(llm, prompts):
    """Generate on the kernel path, recording the smallest relative top-k cut-off gap it met."""
    import dsv32_kernels as K

    orig, gaps = K.topk_indices, []

    def spy(logits, k, *args, **kwargs):
        gaps.append(_cut_gap(logits.reshape(-1, logits.shape[-1]), k))
        return orig(logits, k, *args, **kwargs)

    K.topk_indices = spy
    try:
        return _generate(llm, prompts), min(gaps, default=float("inf"))
    finally:
        K.topk_indices = orig


_CHOSEN: dict = {}


def _tie_free_prompt(llm_kernels, length: int) -> tuple[list[int], int]:
    """First seed whose prompt meets no indexer near-tie on the kernel path (same policy as the oracle)."""
    key = (llm_kernels.engine.model_dir, llm_kernels.engine.numerics, length)
    if key not in _CHOSEN:
        for seed in range(8):
            prompt = _prompt(length, seed)
            _, gap = _generate_with_gap(llm_kernels, [prompt])
            if gap >= MIN_REL_GAP:
                _CHOSEN[key] = (prompt, seed)
                break
        else:
            pytest.fail(f"every candidate prompt of {length} tokens had an indexer near-tie at the top-k cut-off")
    return _CHOSEN[key]


@pytest.fixture(scope="module")
def llms(ckpt):
    from dsv32_engine import LLM

    made = {}

    def get(mode: str, backend: str, **kw):
        key = (mode, backend, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = LLM(ckpt, numerics=mode, dtype="float32", num_pages=32, attention_backend=backend,
                            device="cpu", **kw)
        return made[key]
    return get


# fp8 mode: a guard against gross errors only (a wrong scale or selection moves log-probs by O(1)). The
# paths' ~1e-6 differences flip the e4m3 rounding of a few cached latent values per layer (one ulp: 2^-3
# relative), which then spreads: measured up to 0.02 on a 100-token dense prompt, and the torch path moves
# by as much when its weights are perturbed by 2^-20. The close fp8 comparison is the layer replay.
FP8_GROSS = 0.1
EXACT_LP = 1e-4  # the oracle test's bound


def _assert_same(ours, ref, lp_tol):
    for (tok, lps), (ref_tok, ref_lps) in zip(ours, ref):
        assert tok == ref_tok
        dev = max(abs(a - b) for a, b in zip(lps, ref_lps))
        print(f"{len(tok)} tokens identical; max log-prob deviation {dev:.2e}")
        assert dev < lp_tol


@pytest.mark.parametrize("case", ["exact", "exact-chunked", "fp8-short"])
def test_kernels_backend_on_cpu_gives_the_torch_paths_greedy_tokens(llms, case):
    """``attention_backend="kernels"`` on CPU (the ops' torch twins) vs the default torch path, both prompts
    in one batch (continuous batching mixes a decode step over contexts below and above index_topk).
    exact: log-probs within 1e-4, the oracle's bound. fp8 (short prompt only, see the module docstring):
    tokens identical, log-probs under the gross-error guard ``FP8_GROSS``."""
    mode = "fp8" if case.startswith("fp8") else "exact"
    kw = {"max_num_batched_tokens": 32} if case == "exact-chunked" else {}
    kernels, torch_path = llms(mode, "kernels", **kw), llms(mode, "torch", **kw)
    assert torch_path.engine.attention_backend == "torch" and kernels.engine.attention_backend == "kernels"
    assert isinstance(kernels.engine.model.model.layers[0].self_attn.attention, KernelAttention)
    lengths = [SHORT] if mode == "fp8" else [SHORT, LONG]
    prompts = [_tie_free_prompt(kernels, n)[0] for n in lengths]
    ours = _generate(kernels, prompts)
    _assert_same(ours, _generate(torch_path, prompts), EXACT_LP if mode == "exact" else FP8_GROSS)
    kernels.engine.allocator.check_no_leaks()


def test_default_backend_and_bad_name(ckpt):
    from dsv32_engine.engine import EngineCore
    from dsv32_engine.model import resolve_backend

    assert resolve_backend(None, torch.device("cpu")) == "torch"
    assert resolve_backend(None, torch.device("cuda")) == "kernels"
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineCore(ckpt, num_pages=4, attention_backend="triton")


def test_deepseek_v3_config_same_tokens_on_the_kernel_path(v3_ckpt):
    """No indexer: every causal position is attended (dense MLA through the sparse kernels' twins),
    for a prompt longer than the V3.2 top-k; and the latent-only store (no index pool)."""
    from dsv32_engine import LLM

    prompts = [_prompt(LONG, 0), _prompt(SHORT, 0)]
    for mode in ("exact", "fp8"):
        runs = [_generate(LLM(v3_ckpt, numerics=mode, dtype="float32", num_pages=16, attention_backend=b,
                              device="cpu"), prompts)
                for b in ("torch", "kernels")]
        _assert_same(runs[1], runs[0], EXACT_LP if mode == "exact" else FP8_GROSS)


_TRITON_RUN = """
    import json, sys
    import dsv32_kernels as K
    assert K.interpreter_active() and K.get_backend() == "triton", (K.interpreter_active(), K.get_backend())
    import torch
    from dsv32_kernels import testing as kt
    from dsv32_engine import LLM, SamplingParams
    ckpt, jobs = sys.argv[1], json.loads(sys.argv[2])
    # store_kv without an indexer key (deepseek_v3): the kernel writes the naive twin's latent bytes, nothing else
    g = torch.Generator().manual_seed(0)
    for m in ("exact", "fp8"):
        layout = kt.small_layout(m)
        c, k_pe = torch.randn(40, 128, generator=g), torch.randn(40, 64, generator=g)
        slots = torch.randperm(3 * 64, generator=g)[:40]
        slots[5] = -1
        pools = [torch.zeros(layout.latent_pool_shape(3), dtype=layout.pool_dtype) for _ in range(2)]
        K.store_kv(pools[0], None, c, k_pe, None, slots, layout)
        K.naive_store_kv(pools[1], None, c, k_pe, None, slots, layout)
        assert torch.equal(pools[0].view(torch.uint8), pools[1].view(torch.uint8)), m
        assert pools[0].view(torch.uint8).any()
    out = {}
    for mode, prompts in jobs.items():
        llm = LLM(ckpt, numerics=mode, dtype="float32", num_pages=16, attention_backend="kernels")
        res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=%d, ignore_eos=True, logprobs=0))
        out[mode] = [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
                     for o in res]
        llm.engine.allocator.check_no_leaks()
    print(json.dumps(out))
""" % NEW_TOKENS


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run; on CUDA the kernel path is the default")
def test_forced_triton_under_the_interpreter_gives_the_torch_paths_greedy_tokens(llms, ckpt):
    """The whole engine with every attention op forced onto its Triton kernel (interpreter, in a fresh
    process) vs the torch path: exact mode below and above index_topk (tokens, log-probs within 1e-4),
    fp8 mode below it (tokens; see the CPU-twin test for the fp8 log-prob guard)."""
    pytest.importorskip("triton")
    jobs = {"exact": [_tie_free_prompt(llms("exact", "kernels"), n)[0] for n in (SHORT, LONG)],
            "fp8": [_tie_free_prompt(llms("fp8", "kernels"), SHORT)[0]]}
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSV32_KERNELS")}
    env.update(TRITON_INTERPRET="1", DSV32_KERNELS="triton", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_TRITON_RUN), ckpt, json.dumps(jobs)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    triton_runs = json.loads(r.stdout.strip().splitlines()[-1])
    for mode, prompts in jobs.items():
        ref = _generate(llms(mode, "torch"), prompts)
        _assert_same([tuple(x) for x in triton_runs[mode]], ref, EXACT_LP if mode == "exact" else FP8_GROSS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton kernels)")
def test_compiled_kernels_on_cuda_give_the_torch_paths_greedy_tokens(llms, ckpt):
    """On CUDA the kernel path is the default: compiled Triton vs the torch path, fp32 exact mode (fp32
    pools: both sides run fp32 products), below and above index_topk. Not yet run on a GPU."""
    from dsv32_engine import LLM

    prompts = [_tie_free_prompt(llms("exact", "kernels"), n)[0] for n in (SHORT, LONG)]
    runs = [_generate(LLM(ckpt, dtype="float32", num_pages=32, device="cuda", attention_backend=b), prompts)
            for b in ("torch", "kernels")]
    _assert_same(runs[1], runs[0], EXACT_LP)
