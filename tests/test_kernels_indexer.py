"""indexer_logits (decode, prefill) and topk_indices: Triton vs torch twin, twin vs dense unpaged math.

Tolerances (error model in dsv32_kernels.testing): both implementations compute in
fp32 on identical e4m3/float inputs (products of e4m3 values are exact in fp32), so
they differ only by summation order over D key dims and H heads: at most
``2·γ_{D+H}·mag`` with ``mag = Σ_h |w_h·qs_h| Σ_d |q_hd·k_d|·ks`` (the logits of the
absolute values). The compiled fp8 MMA on Hopper adds ``2^-13·mag``.
"""

from __future__ import annotations

import torch

from kernel_params import DEVICES  # noqa: E402  (sets TRITON_INTERPRET before triton loads)

import pytest  # noqa: E402

import dsv32_kernels as K  # noqa: E402
from dsv32_kernels import fp8  # noqa: E402
from dsv32_kernels.layout import CacheLayout  # noqa: E402
from dsv32_kernels import testing as kt  # noqa: E402

MODES = ["fp8", "exact"]
NEG_INF = float("-inf")

# name -> (context lengths, query tokens per request, extra kwargs)
DECODE_CASES = {
    "one-page": ([30], 1, {}),
    "page-boundary-64": ([64], 1, {}),
    "page-boundary-65-mtp2": ([65], 2, {}),
    "ragged-requests": ([70, 130, 5], 1, {}),
    "ragged-requests-mtp2": ([70, 130, 5], 2, {}),
    "context-is-only-queries": ([2, 129], 2, {}),
    "non-contiguous-q": ([70, 40], 1, {"strided": True}),
    "max-ctx-shorter": ([70, 130], 1, {"max_ctx": 100}),
    "max-ctx-longer": ([70, 20], 1, {"max_ctx": 300}),
}


def _layout(mode: str) -> CacheLayout:
    return kt.small_layout(mode)


def _decode_inputs(case: str, mode: str, device: str, seed: int = 0):
    lens, n, extra = DECODE_CASES[case]
    big = device == "cuda"
    if big:
        lens = [x * 23 + 1 for x in lens]
    H = 64 if big else 4
    layout = _layout(mode)
    cache = kt.build_cache(layout, lens, seed=seed, device=device)
    if extra.get("strided"):  # strided context lengths and block tables too
        cache.context_lens = torch.stack([cache.context_lens] * 2, 1)[:, 0]
        cache.block_tables = torch.stack([cache.block_tables] * 2, 2)[..., 0]
    g = torch.Generator().manual_seed(seed + 1)
    B = len(lens)
    q = torch.randn(B, n, H, layout.index_head_dim, generator=g)
    if extra.get("strided"):
        q = torch.randn(B, n, layout.index_head_dim, 2 * H, generator=g).transpose(2, 3)[:, :, ::2]
    q, qs = kt.indexer_query(layout, q.to(device))
    w = torch.randn(B, n, H, generator=g).to(device)
    return layout, cache, q, w, qs, extra.get("max_ctx")


def _abs_pool(pool: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    if layout.mode == "exact":
        return pool.abs()
    out = pool.clone()
    out[:, :layout.index_scale_offset] &= 0x7F  # clear the e4m3 sign bits; scales are positive
    return out


def _decode_mag(layout, cache, q, w, qs, max_ctx):
    return K.naive_indexer_logits_decode(q.float().abs(), w.abs(), _abs_pool(cache.index_pool, layout),
                                         cache.block_tables, cache.context_lens, layout, qs, max_ctx=max_ctx)


def _assert_logits_close(got, want, mag, n_terms, extra_rel=0.0):
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    bound = (2 * kt.gamma(n_terms) + extra_rel) * mag[fin] + 1e-30
    err = (got[fin] - want[fin]).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, bound there {bound[err.argmax()]:.3g}"


@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_decode_triton_matches_naive(device, mode, case):
    layout, cache, q, w, qs, max_ctx = _decode_inputs(case, mode, device)
    args = (q, w, cache.index_pool, cache.block_tables, cache.context_lens, layout, qs)
    want = K.naive_indexer_logits_decode(*args, max_ctx=max_ctx)
    with K.backend("triton"):
        got = K.indexer_logits_decode(*args, max_ctx=max_ctx)
    extra = kt.FP8_MMA_REL if device == "cuda" and mode == "fp8" else 0.0
    _assert_logits_close(got, want, _decode_mag(layout, cache, q, w, qs, max_ctx), q.shape[-1] + q.shape[-2], extra)


def _dense_decode(layout, cache, q, w, qs):
    """Per request, per query token: the formula on the unpaged keys (what store_kv put in)."""
    B, n, H, _ = q.shape
    rows = []
    for b in range(B):
        k, ks = kt.cached_index_key(layout, cache.index_k[b])
        ctx = int(cache.context_lens[b])
        per_tok = []
        for i in range(n):
            pos = ctx - n + i
            scores = q[b, i].float() @ k[:pos + 1].float().T  # [H, pos+1]
            wi = w[b, i] * (qs[b, i] if qs is not None else 1.0)
            logit = (scores.clamp_min(0) * wi[:, None]).sum(0)
            per_tok.append(logit * ks[:pos + 1] if ks is not None else logit)
        rows.append(per_tok)
    return rows


@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_decode_naive_matches_dense(mode, case):
    layout, cache, q, w, qs, max_ctx = _decode_inputs(case, mode, "cpu", seed=3)
    got = K.naive_indexer_logits_decode(q, w, cache.index_pool, cache.block_tables, cache.context_lens, layout, qs,
                                        max_ctx=max_ctx)
    mag = _decode_mag(layout, cache, q, w, qs, max_ctx)
    width = got.shape[-1]
    for b, per_tok in enumerate(_dense_decode(layout, cache, q, w, qs)):
        for i, logit in enumerate(per_tok):
            want = torch.full((width,), NEG_INF)
            m = min(width, len(logit))
            want[:m] = logit[:m]
            _assert_logits_close(got[b, i], want, mag[b, i], q.shape[-1] + q.shape[-2])


def test_decode_fp8_within_quantisation_error_of_exact():
    """The fp8 logits stay within the e4m3 error bound of the unquantised (rotated) fp32 math."""
    layout = _layout("fp8")
    lens = [70, 130]
    cache = kt.build_cache(layout, lens, seed=5)
    g = torch.Generator().manual_seed(6)
    qf = torch.randn(2, 1, 4, 128, generator=g)
    w = torch.randn(2, 1, 4, generator=g)
    q8, qs = kt.indexer_query(layout, qf)
    got = K.naive_indexer_logits_decode(q8, w, cache.index_pool, cache.block_tables, cache.context_lens, layout, qs)
    for b, ctx in enumerate(lens):
        qr = fp8.hadamard(qf[b, 0])  # [H, D] rotated fp32
        kr = fp8.hadamard(cache.index_k[b])  # [ctx, D]
        _, ks = kt.cached_index_key(layout, cache.index_k[b])
        exact = ((qr @ kr.T).clamp_min(0) * w[b, 0][:, None]).sum(0)
        # |Δq| <= 2^-4|q| + 2^-10·s_q (normals / subnormals of e4m3), same for k; ReLU is 1-Lipschitz
        eq = kt.E4M3_REL * qr.abs() + 2.0 ** -10 * qs[b, 0][:, None]
        ek = kt.E4M3_REL * kr.abs() + 2.0 ** -10 * ks[:, None]
        bound = w[b, 0].abs() @ (eq @ kr.abs().T + qr.abs() @ ek.T + eq @ ek.T)
        err = (got[b, 0, :ctx] - exact).abs()
        assert (err <= bound * 1.001 + 1e-5).all()
        assert err.max() > 0  # the fp8 path really quantised


# -- prefill -----------------------------------------------------------------------------------
def _prefill_ranges(case: str, big: bool):
    """(T, S, ks, ke): ragged key ranges like DeepGEMM's fp8_mqa_logits; causality lives in ke."""
    f = 11 if big else 1
    if case == "causal-one-request":
        T = S = 70 * f
        ks, ke = [0] * T, [t + 1 for t in range(T)]
    elif case == "two-requests-chunked":  # A: 40 tokens from scratch; B: last 30 of a 90-token context
        a, b_ctx, b_new = 40 * f, 90 * f, 30 * f
        S, T = a + b_ctx, a + b_new
        ks = [0] * a + [a] * b_new
        ke = [t + 1 for t in range(a)] + [a + b_ctx - b_new + i + 1 for i in range(b_new)]
    elif case == "empty-ranges":
        T, S = 9, 130 * f
        ks = [0, 5, 64, 64, 100, 0, 3, 129, 7]
        ke = [0, 70, 64, 128, 130, 1, 3, 130, 120]
    elif case == "tail-block-t7":
        T, S = 7, 66 * f
        ks, ke = [0] * T, [S - T + t + 1 for t in range(T)]
    else:
        raise KeyError(case)
    return T, S, torch.tensor(ks, dtype=torch.int32), torch.tensor(ke, dtype=torch.int32)


PREFILL_CASES = ["causal-one-request", "two-requests-chunked", "empty-ranges", "tail-block-t7", "non-contiguous"]


def _prefill_inputs(case, mode, device, seed=0):
    big = device == "cuda"
    T, S, ks, ke = _prefill_ranges("causal-one-request" if case == "non-contiguous" else case, big)
    H, D = (64 if big else 4), 128
    g = torch.Generator().manual_seed(seed)
    qf = torch.randn(T, H, D, generator=g)
    kf = torch.randn(S, D, generator=g)
    if case == "non-contiguous":
        qf = torch.randn(T, D, 2 * H, generator=g).transpose(1, 2)[:, ::2]
        kf = torch.randn(D, 2 * S, generator=g).T[::2]
    w = torch.randn(T, H, generator=g)
    layout = _layout(mode)
    q, qs = kt.indexer_query(layout, qf)
    if mode == "fp8":
        k, ksc = kt.cached_index_key(layout, kf)
        if case == "non-contiguous":
            k = torch.empty(2 * S, D, dtype=k.dtype).copy_(k.repeat_interleave(2, 0))[::2]
    else:
        k, ksc = kf, None
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return mv(q), mv(w), mv(k), mv(ksc), mv(ks), mv(ke), mv(qs)


def _prefill_mag(q, w, k, ksc, ks, ke, qs):
    return K.naive_indexer_logits_prefill(q.float().abs(), w.abs(), k.float().abs(), ksc, ks, ke, qs)


@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_triton_matches_naive(device, mode, case):
    args = _prefill_inputs(case, mode, device)
    want = K.naive_indexer_logits_prefill(*args)
    with K.backend("triton"):
        got = K.indexer_logits_prefill(*args)
    q = args[0]
    extra = kt.FP8_MMA_REL if device == "cuda" and mode == "fp8" else 0.0
    _assert_logits_close(got, want, _prefill_mag(*args), q.shape[-1] + q.shape[-2], extra)


@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_prefill_naive_matches_dense(mode, case):
    q, w, k, ksc, ks, ke, qs = args = _prefill_inputs(case, mode, "cpu", seed=2)
    got = K.naive_indexer_logits_prefill(*args)
    mag = _prefill_mag(*args)
    want = torch.full_like(got, NEG_INF)
    for t in range(q.shape[0]):
        lo, hi = int(ks[t]), int(ke[t])
        s = (q[t].float() @ k[lo:hi].float().T).clamp_min(0)  # [H, hi-lo]
        wt = w[t] * (qs[t] if qs is not None else 1.0)
        row = (s * wt[:, None]).sum(0)
        want[t, lo:hi] = row * ksc[lo:hi] if ksc is not None else row
    _assert_logits_close(got, want, mag, q.shape[-1] + q.shape[-2])


# -- top-k -----------------------------------------------------------------------------------------
TOPK_CASES = ["k-below-visible", "k-above-visible-padded", "k-above-width", "all-invisible-row",
              "prefill-offsets", "missing-page"]


def _topk_inputs(case: str, device: str, seed: int = 0):
    """(logits, k, block_tables, kwargs); logits are distinct random values (no ties)."""
    g = torch.Generator().manual_seed(seed)
    big = device == "cuda"
    B, n, L = 3, 2, (640 if big else 192)
    logits = torch.randn(B, n, L, generator=g)
    pos = torch.tensor([[100, 101], [150, 151], [20, 21]]) * (3 if big else 1)
    logits[torch.arange(L) > pos[..., None]] = NEG_INF
    bt = torch.stack([torch.randperm(16, generator=g)[:L // 64] for _ in range(B)]).to(torch.int32)
    k, kwargs = 64 if big else 16, {}
    if case == "k-above-visible-padded":
        k = 160 if big else 48
    elif case == "k-above-width":
        k = L + 8
    elif case == "all-invisible-row":
        logits[1, 0] = NEG_INF
    elif case == "prefill-offsets":  # [T, S] over two requests' concatenated keys
        T, S = 6, L
        logits = torch.randn(T, S, generator=g)
        ks = torch.tensor([0, 0, 0, 90, 90, 90])
        ke = torch.tensor([10, 40, 90, 100, 150, 192]) * (3 if big else 1) // (3 if big else 1)
        j = torch.arange(S)
        logits[(j < ks[:, None]) | (j >= ke[:, None])] = NEG_INF
        kwargs = {"row_req": torch.tensor([0, 0, 0, 1, 1, 1]), "col_offset": ks}
        bt = bt[:2]
    elif case == "missing-page":
        bt[0, 1] = -1
    mv = {key: v.to(device) for key, v in kwargs.items()}
    return logits.to(device), k, bt.to(device), mv


@pytest.mark.parametrize("by_position", [False, True], ids=["by-score", "by-position"])
@pytest.mark.parametrize("case", TOPK_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_topk_triton_matches_naive(device, case, by_position):
    logits, k, bt, kwargs = _topk_inputs(case, device)
    want = K.naive_topk_indices(logits, k, bt, by_position=by_position, **kwargs)
    with K.backend("triton"):
        got = K.topk_indices(logits, k, bt, by_position=by_position, **kwargs)
    for a, b in zip(got, want):  # same torch.topk underneath, integer mapping after: exact
        assert a.dtype == torch.int32 and torch.equal(a, b)


@pytest.mark.parametrize("by_position", [False, True], ids=["by-score", "by-position"])
@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk_naive_matches_dense(case, by_position):
    logits, k, bt, kwargs = _topk_inputs(case, "cpu", seed=1)
    logical, physical = K.naive_topk_indices(logits, k, bt, by_position=by_position, **kwargs)
    rows = logits.reshape(-1, logits.shape[-1])
    R = rows.shape[0]
    req = kwargs.get("row_req", torch.arange(R) // (R // bt.shape[0]))
    off = kwargs.get("col_offset", torch.zeros(R, dtype=torch.long))
    for r in range(R):
        vis = torch.nonzero(torch.isfinite(rows[r])).flatten().tolist()
        best = sorted(vis, key=lambda j: -rows[r, j].item())[:k]
        if by_position:  # the same set, in column order
            best = sorted(best)
        want_log = [j - int(off[r]) for j in best] + [-1] * (k - len(best))
        want_phys = []
        for j in want_log:
            page = int(bt[req[r], j // 64]) if j >= 0 else -1
            want_phys.append(page * 64 + j % 64 if page >= 0 else -1)
        assert logical.reshape(R, k)[r].tolist() == want_log
        assert physical.reshape(R, k)[r].tolist() == want_phys


def test_topk_without_block_tables_is_logical():
    logits = torch.tensor([[0.5, NEG_INF, 2.0, 1.0]])
    logical, physical = K.topk_indices(logits, 3)
    assert logical.tolist() == [[2, 3, 0]] and torch.equal(logical, physical)
