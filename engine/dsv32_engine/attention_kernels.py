"""The kernel path of one MLA layer's attention: cache store, indexer selection and sparse attention
through ``dsv32_kernels`` (Triton on CUDA, the ops' torch twins elsewhere).

``KernelAttention`` takes the same :class:`~.attention.Projected` step as the torch path
(``attention.py``) and is chosen the same way (``EngineCore(..., attention_backend="kernels")``,
the default on CUDA). What changes is how it stores and attends:

1. ``store_kv`` writes the step's latent ``[c ‖ k_pe]`` and indexer keys into the
   paged pools in one op (the same bytes as ``paged.store_latent`` / ``store_index_key``);
2. selection: with an indexer and a context longer than ``index_topk``,
   ``indexer_logits_decode`` (paged keys; only the rows of a decode batch whose
   context exceeds top-k) or ``indexer_logits_prefill`` (the sequence's keys
   gathered into one ragged block, ``ke = position + 1``) then ``topk_indices``
   give each query its physical slots in ascending position order (``-1``
   padded); otherwise (short context, or a ``deepseek_v3`` model without
   indexer) the indices are every causal position, which is bit for bit what the
   indexer would select;
3. attention in the absorbed MQA form for decode *and* prefill (spec §3.1):
   ``q = [q_nope·W_UK ‖ q_pe]`` (576 for V3.2) against the cached 576 values of
   the selected slots (``sparse_mla_decode`` / ``sparse_mla_prefill``), then
   ``o = o_lat·W_UVᵀ`` per head.

Numerics against the torch path (``TorchAttention._decode`` / ``_prefill``): the same
cache bytes and the same selection rule; the indexer's ``head_dim^-0.5`` is
folded into the head weights (``Σ_h ReLU(q_h·k)·(w_h·d^-0.5)``, equal up to
rounding since the factor is positive), and in fp8 mode the kernel gets
``q`` as e4m3 + pow2 scale: re-quantising the model's FP8-rounded query gives
back exactly the same values. Prefill runs absorbed here and expanded (MHA) on
the torch path: the same sums in another order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

import dsv32_kernels as K
from dsv32_kernels import fp8
from .attention import Attention, Projected

_ROWS_X_CONTEXT = 1 << 24  # bound on the [query rows, context] logits / index tensors of one prefill chunk


class _IndexQuery(NamedTuple):
    """The step's indexer query as the kernels take it."""

    q: torch.Tensor             # [T, index_n_heads, index_head_dim]: e4m3 (fp8 mode) or fp32 (exact)
    scale: torch.Tensor | None  # [T, index_n_heads] pow2 scales (fp8 mode)
    w: torch.Tensor             # [T, index_n_heads] head weights, index_head_dim^-0.5 folded in


def _index_query(p: Projected, head_dim: int, fp8_mode: bool) -> _IndexQuery:
    """In fp8 mode ``p.index_q`` is already Hadamard-rotated and FP8-rounded (``Indexer.project``);
    quantising it again reproduces the same products ``q8·s`` exactly (pow2 scales)."""
    w = p.index_w * head_dim ** -0.5  # Indexer.scores applies it inside the ReLU
    if not fp8_mode:
        return _IndexQuery(p.index_q, None, w)
    q, s = fp8.quant_blocks(p.index_q)
    return _IndexQuery(q, s.squeeze(-1), w)


def _all_positions(tables: torch.Tensor, lens: torch.Tensor, width: int, page: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position ``< lens[b]``: (logical, physical) ``[B, width]`` int32, ``-1`` padded."""
    pos = torch.arange(width, device=tables.device)
    ok = pos[None, :] < lens[:, None]
    pages = tables.long().gather(1, (pos // page).clamp_max(tables.shape[1] - 1).expand(tables.shape[0], -1))
    physical = torch.where(ok, pages * page + pos % page, -1)
    logical = torch.where(ok, pos[None, :], -1)
    return logical.to(torch.int32), physical.to(torch.int32)


def _record(batch, layer: int, seq, logical: torch.Tensor) -> None:
    """``batch.record_topk`` entry as the torch path writes it: ``[rows, context_len]`` bool of attended positions."""
    vis = torch.zeros(logical.shape[0], seq.context_len + 1, dtype=torch.bool, device=logical.device)
    vis.scatter_(1, torch.where(logical >= 0, logical.long(), seq.context_len), True)
    batch.record_topk.append((layer, seq, vis[:, : seq.context_len]))


class KernelAttention(Attention):
    def store(self, p: Projected, slot_mapping: torch.Tensor, cache) -> None:
        index_pool = None if self.indexer is None else cache.index[self.layer]
        K.store_kv(cache.latent[self.layer], index_pool, p.c, p.k_pe, p.index_k, slot_mapping, self.layout)

    def __call__(self, p: Projected, batch, cache) -> torch.Tensor:
        T, dev = p.q_nope.shape[0], p.q_nope.device
        iq = None if self.indexer is None else _index_query(p, self.indexer.head_dim, self.layout.mode == "fp8")
        # absorbed query [T, H, kv_lora_rank + rope]; the output is mapped back through W_UV
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]
        q_abs = torch.cat([torch.einsum("thd,hdc->thc", p.q_nope, w_uk), p.q_pe], dim=-1)
        out = torch.empty(T, self.n_heads, self.v_dim, dtype=p.q_nope.dtype, device=dev)
        decode = [s for s in batch.seqs if s.num_new == 1]
        if decode:
            self._decode(q_abs, iq, w_uv, decode, cache, batch, out)
        for s in batch.seqs:
            if s.num_new > 1:
                self._prefill(q_abs, iq, w_uv, s, cache, batch, out)
        return out

    # -- decode: one query row per sequence, paged indexer logits ------------------------
    def _decode(self, q_abs, iq: _IndexQuery | None, w_uv, seqs, cache, batch, out) -> None:
        """Attention of one query row per sequence in ``seqs``, written into ``out[row]``."""
        dev, page, topk = q_abs.device, self.layout.page_size, self.cfg.index_topk
        rows = torch.tensor([s.start for s in seqs], device=dev)
        tables = torch.nn.utils.rnn.pad_sequence([s.block_table for s in seqs], batch_first=True,
                                                 padding_value=-1).to(torch.int32)
        lens = torch.tensor([s.context_len for s in seqs], dtype=torch.int32, device=dev)
        lmax = max(s.context_len for s in seqs)
        indexed = [] if iq is None else [b for b, s in enumerate(seqs) if self._uses_indexer(s.context_len)]
        width = min(topk, lmax) if indexed else lmax
        logical, physical = _all_positions(tables, lens, width, page)  # contexts that fit: every visible position
        if indexed:
            sub = torch.tensor(indexed, device=dev)
            r = rows[sub]
            logits = K.indexer_logits_decode(iq.q[r, None], iq.w[r, None], cache.index[self.layer], tables[sub],
                                             lens[sub], self.layout, None if iq.scale is None else iq.scale[r, None],
                                             max_ctx=max(seqs[b].context_len for b in indexed))
            lg, ph = K.topk_indices(logits, width, tables[sub], page_size=page, by_position=True)  # [R, 1, width]
            logical[sub], physical[sub] = lg[:, 0], ph[:, 0]
        o_lat, _ = K.sparse_mla_decode(q_abs[rows], cache.latent[self.layer], physical, self.scale, self.layout)
        out[rows] = torch.einsum("bhc,hdc->bhd", o_lat.to(out.dtype), w_uv)
        if batch.record_topk is not None:
            for b, s in enumerate(seqs):
                _record(batch, self.layer, s, logical[b:b + 1])

    # -- prefill: the sequence's keys as one ragged block, queries in bounded chunks ------------
    def _prefill(self, q_abs, iq: _IndexQuery | None, w_uv, s, cache, batch, out) -> None:
        """Attention of the ``s.num_new`` query rows of sequence ``s``, written into ``out``."""
        dev, page, layout = q_abs.device, self.layout.page_size, self.layout
        n, L = s.num_new, s.context_len
        table = s.block_table[None].to(torch.int32)
        pos_ctx = torch.arange(L, device=dev)
        slots = s.block_table[pos_ctx // page] * page + pos_ctx % page
        use_index = iq is not None and self._uses_indexer(L)
        if use_index:  # DeepGEMM fp8_mqa_logits form
            index_pool = cache.index[self.layer]
            if layout.mode == "fp8":
                keys, scales = fp8.index_page_views(index_pool, layout)
                k_ctx, k_scale = keys[slots // page, slots % page], scales[slots // page, slots % page]
            else:
                k_ctx, k_scale = index_pool[slots // page, slots % page], None
        step = max(1, _ROWS_X_CONTEXT // L)
        vis_rows = []
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            rows = slice(s.start + r0, s.start + r1)
            q_pos = torch.arange(L - n + r0, L - n + r1, device=dev)
            if use_index:
                ks = torch.zeros(r1 - r0, dtype=torch.int32, device=dev)
                ke = (q_pos + 1).to(torch.int32)
                logits = K.indexer_logits_prefill(iq.q[rows], iq.w[rows], k_ctx, k_scale, ks, ke,
                                                  None if iq.scale is None else iq.scale[rows])
                logical, physical = K.topk_indices(logits, min(self.cfg.index_topk, L), table, page_size=page,
                                                   by_position=True)  # [rows, topk]
            else:
                ok = pos_ctx[None, :] <= q_pos[:, None]
                logical = torch.where(ok, pos_ctx[None, :], -1).to(torch.int32)
                physical = torch.where(ok, slots[None, :], -1).to(torch.int32)
            o_lat, _ = K.sparse_mla_prefill(q_abs[rows], cache.latent[self.layer], physical, self.scale, layout)
            out[rows] = torch.einsum("thc,hdc->thd", o_lat.to(out.dtype), w_uv)
            if batch.record_topk is not None:
                vis_rows.append(logical)
        if batch.record_topk is not None:
            _record(batch, self.layer, s, torch.cat(vis_rows))
