"""sparse_mla_decode / sparse_mla_prefill: Triton vs torch twin, twin vs dense unpaged attention.

Tolerance (error model in dsv32_kernels.testing), per row and head: scores differ by at
most ``δ = (2·γ_576 + ε_q)·max_k sm_scale·Σ_d|q_d·K_kd|`` (summation order; ``ε_q = 2^-8``
when the compiled kernel rounds ``q`` to bf16 for its MMA - fp8-dequantised K is exact in
bf16). Softmax weights then move by at most a factor ``e^{±2δ}``, so
``|Δo| <= (e^{2δ} - 1 + 2·γ_{2·topk} + ε_p)·max|V|`` (``ε_p = 2^-8``: ``p`` rounded to bf16
on the GPU) and ``|Δlse| <= δ + 4·γ_topk·(1 + |lse|)``.
"""

from __future__ import annotations

import math
import torch

from kernel_params import DEVICES  # noqa: E402  (sets TRITON_INTERPRET before triton loads)

import pytest  # noqa: E402

import dsv32_kernels as K  # noqa: E402
from dsv32_kernels.layout import CacheLayout  # noqa: E402
from dsv32_kernels import testing as kt  # noqa: E402

MODES = ["fp8", "exact"]

# name -> (context lengths, topk, options); decode: one query row per request
DECODE_CASES = {
    "topk-below-context": ([200], 8, {}),
    "topk-above-context-padded": ([40], 70, {}),
    "all-minus-one-row": ([90, 30], 24, {"empty_rows": [1]}),
    "page-boundary": ([130], 8, {"positions": [62, 63, 64, 65, 127, 128, 129]}),
    "ragged-requests": ([70, 130, 5], 40, {}),
    "non-contiguous-q": ([70, 50], 24, {"strided": True}),
    "split-topk-3": ([150, 60], 48, {"splits": 3}),
    "padded-page-stride": ([100], 20, {"stride_pad": 1}),
    "heads-20-two-blocks": ([70], 16, {"heads": 20}),
}


def _layout(mode: str, big: bool) -> CacheLayout:
    return CacheLayout(512, 64, 128, mode=mode) if big else kt.small_layout(mode)


def _pick(g, ctx: int, topk: int, opts: dict) -> torch.Tensor:
    """Positions selected for one query (-1 padded, padding scattered through the row)."""
    if "positions" in opts:
        pos = torch.tensor([p for p in opts["positions"] if p < ctx][:topk])
    else:
        pos = torch.randperm(ctx, generator=g)[:min(topk, ctx)]
    row = torch.full((topk,), -1, dtype=torch.long)
    row[torch.randperm(topk, generator=g)[:len(pos)]] = pos
    return row


def _rows_to_slots(cache: kt.PagedCache, req: list[int], pos: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(pos, -1)
    for r, b in enumerate(req):
        ok = pos[r] >= 0
        out[r, ok] = cache.slots(b).cpu()[pos[r, ok]]
    return out.to(torch.int32)


def _make_q(g, R, H, dim, strided):
    if strided:
        return torch.randn(R, dim, 2 * H, generator=g).transpose(1, 2)[:, ::2]
    return torch.randn(R, H, dim, generator=g)


def _decode_inputs(case: str, mode: str, device: str, seed: int = 0):
    lens, topk, opts = DECODE_CASES[case]
    big = device == "cuda"
    if big:
        lens, topk = [x * 30 + 7 for x in lens], min(2048, topk * 40)
    H = opts.get("heads", 128 if big else 4)
    layout = _layout(mode, big)
    cache = kt.build_cache(layout, lens, seed=seed, page_stride_pad=opts.get("stride_pad", 0), device=device)
    g = torch.Generator().manual_seed(seed + 1)
    pos = torch.stack([_pick(g, n, topk, opts) for n in lens])
    for r in opts.get("empty_rows", []):
        pos[r] = -1
    req = list(range(len(lens)))
    q = _make_q(g, len(lens), H, layout.latent_dim, opts.get("strided", False))
    return layout, cache, q.to(device), req, pos, _rows_to_slots(cache, req, pos).to(device), opts


def _dense(layout, cache, q, req, pos, sm_scale):
    """Per row: gather the selected positions' cached [c ‖ k_pe] (fp8: unpack(pack(...))), softmax, sum."""
    R, H, _ = q.shape
    o = torch.zeros(R, H, layout.kv_lora_rank)
    lse = torch.full((R, H), float("-inf"))
    kvs = []
    for r, b in enumerate(req):
        sel = pos[r][pos[r] >= 0]
        kv = kt.cached_latent(layout, cache.c[b][sel].cpu(), cache.k_pe[b][sel].cpu())  # [n_sel, 576]
        kvs.append(kv)
        if len(sel):
            s = q[r].float().cpu() @ kv.T * sm_scale  # [H, n_sel]
            o[r] = torch.softmax(s, dim=-1) @ kv[:, :layout.kv_lora_rank]
            lse[r] = torch.logsumexp(s, dim=-1)
    return o, lse, kvs


def _assert_attention_close(got, want, q, kvs, sm_scale, topk, layout, gpu_mma: bool):
    (o, lse), (o_ref, lse_ref) = got, want
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert o.shape == o_ref.shape and lse.shape == lse_ref.shape
    o, lse, o_ref, lse_ref = o.cpu(), lse.cpu(), o_ref.cpu(), lse_ref.cpu()
    eps = 2.0 ** -8 if gpu_mma else 0.0
    for r, kv in enumerate(kvs):
        if len(kv) == 0:  # a row with only -1: o = 0, lse = -inf
            assert torch.equal(o[r], torch.zeros_like(o[r])) and torch.isneginf(lse[r]).all()
            assert torch.isneginf(lse_ref[r]).all()
            continue
        mag = sm_scale * (q[r].float().abs().cpu() @ kv.abs().T)  # [H, n_sel]
        delta = (2 * kt.gamma(layout.latent_dim) + eps) * mag.max(-1).values  # [H]
        vmax = kv[:, :layout.kv_lora_rank].abs().max()
        o_bound = (torch.expm1(2 * delta) + 2 * kt.gamma(2 * topk) + eps) * vmax + 1e-30
        lse_bound = delta + 4 * kt.gamma(topk) * (1 + lse_ref[r].abs())
        o_err = (o[r] - o_ref[r]).abs().amax(-1)
        assert (o_err <= o_bound).all(), f"row {r}: o err {o_err.max():.3g} > bound {o_bound.min():.3g}"
        assert ((lse[r] - lse_ref[r]).abs() <= lse_bound).all()


def _gpu_mma(device, layout):
    return device == "cuda" and layout.mode == "fp8"  # exact mode on GPU runs fp32 pools: fp32 MMA


@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_decode_triton_matches_naive(device, mode, case):
    layout, cache, q, req, pos, idx, opts = _decode_inputs(case, mode, device)
    sm_scale = 1 / math.sqrt(192)
    want = K.naive_sparse_mla_decode(q, cache.latent_pool, idx, sm_scale, layout)
    with K.backend("triton"):
        got = K.sparse_mla_decode(q, cache.latent_pool, idx, sm_scale, layout, num_splits=opts.get("splits"))
    _, _, kvs = _dense(layout, cache, q, req, pos, sm_scale)
    _assert_attention_close(got, want, q, kvs, sm_scale, idx.shape[1], layout, _gpu_mma(device, layout))


@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_decode_naive_matches_dense(mode, case):
    layout, cache, q, req, pos, idx, _ = _decode_inputs(case, mode, "cpu", seed=4)
    sm_scale = 0.1352338  # DeepSeek-V3.2's (spec §3.3)
    got = K.naive_sparse_mla_decode(q, cache.latent_pool, idx, sm_scale, layout)
    o, lse, kvs = _dense(layout, cache, q, req, pos, sm_scale)
    _assert_attention_close(got, (o, lse), q, kvs, sm_scale, idx.shape[1], layout, False)


# -- prefill: many query rows, each with its own causal selection ---------------------------------------
PREFILL_CASES = {
    "causal-topk-below": ([130], 16, {}),
    "causal-topk-above-padded": ([40], 48, {}),
    "chunked-two-requests": ([70, 100], 24, {"chunk": 12}),
    "non-contiguous-q": ([90], 16, {"strided": True}),
}


def _prefill_inputs(case: str, mode: str, device: str, seed: int = 0):
    lens, topk, opts = PREFILL_CASES[case]
    big = device == "cuda"
    if big:
        lens, topk = [x * 20 + 3 for x in lens], min(2048, topk * 40)
    H = 128 if big else 4
    layout = _layout(mode, big)
    cache = kt.build_cache(layout, lens, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    req, rows = [], []
    per_req = opts.get("chunk", 10) if not big else 64
    for b, n in enumerate(lens):  # the last `per_req` positions of each request are the query tokens
        for p in range(max(0, n - per_req), n):
            req.append(b)
            rows.append(_pick(g, p + 1, topk, {}))  # causal: positions <= p
    pos = torch.stack(rows)
    q = _make_q(g, len(rows), H, layout.latent_dim, opts.get("strided", False))
    return layout, cache, q.to(device), req, pos, _rows_to_slots(cache, req, pos).to(device)


@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_triton_matches_naive(device, mode, case):
    layout, cache, q, req, pos, idx = _prefill_inputs(case, mode, device)
    sm_scale = 1 / math.sqrt(192)
    want = K.naive_sparse_mla_prefill(q, cache.latent_pool, idx, sm_scale, layout)
    with K.backend("triton"):
        got = K.sparse_mla_prefill(q, cache.latent_pool, idx, sm_scale, layout)
    _, _, kvs = _dense(layout, cache, q, req, pos, sm_scale)
    _assert_attention_close(got, want, q, kvs, sm_scale, idx.shape[1], layout, _gpu_mma(device, layout))


@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_prefill_naive_matches_dense(mode, case):
    layout, cache, q, req, pos, idx = _prefill_inputs(case, mode, "cpu", seed=7)
    sm_scale = 0.1352338
    got = K.naive_sparse_mla_prefill(q, cache.latent_pool, idx, sm_scale, layout)
    o, lse, kvs = _dense(layout, cache, q, req, pos, sm_scale)
    _assert_attention_close(got, (o, lse), q, kvs, sm_scale, idx.shape[1], layout, False)


def test_dense_topk_equals_full_attention_when_everything_is_selected():
    """Selecting every position of a short context is plain causal attention (spec §3.4, contexts <= 2048)."""
    layout = kt.small_layout("exact")
    cache = kt.build_cache(layout, [50], seed=9)
    q = torch.randn(1, 4, layout.latent_dim)
    idx = cache.slots(0)[None].to(torch.int32)
    o, lse = K.sparse_mla_decode(q, cache.latent_pool, idx, 0.1, layout)
    kv = torch.cat([cache.c[0], cache.k_pe[0]], -1)
    s = q[0] @ kv.T * 0.1
    torch.testing.assert_close(o[0], torch.softmax(s, -1) @ cache.c[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[0], torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
