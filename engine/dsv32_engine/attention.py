"""The attention of one MLA layer, after its projections: the seam and the torch path.

``MLA.forward`` (model.py) projects the step's tokens once into a :class:`Projected`,
then hands it to the layer's attention object, chosen when the model is built
(``DeepseekV32ForCausalLM(..., attention_backend="torch" | "kernels")``):

1. ``store`` writes the step's latent ``[c ‖ k_pe]`` and indexer keys into the paged
   pools (``MLA.forward`` fires ``batch.on_layer_done`` right after it);
2. ``__call__`` attends: every sequence over its whole paged context, the per-head
   outputs ``[T, H, v_head_dim]`` before ``o_proj``. Sequences with one new token
   take the **decode** path (batched), the others the **prefill** path. With an
   indexer, a query whose visible context exceeds ``index_topk`` attends to the
   top-k tokens the lightning indexer chooses.

DSA prunes: past ``index_topk`` a query's cost follows top-k, not its context. The indexer
is one batched product per step (per chunk of pages) over the paged keys, ``torch.topk``
selects without sorting the context, and only the selected latent rows are gathered from
the pages. A sequence whose context fits in top-k skips the indexer (its selection is
every visible token: exact by construction, and bit for bit what the indexer path gives,
since selected positions are attended in ascending order on both).

:class:`TorchAttention` (here) is the reference, in plain torch over the engine's own
cache accessors (``paged``): prefill rows that see at most top-k tokens as MHA with
``kv_b_proj`` expanded per head, the others and decode absorbed in the 512-d latent
space over their gathered rows. ``KernelAttention`` (attention_kernels.py) runs the
same steps through the ``dsv32_kernels`` ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dsv32_kernels.layout import CacheLayout
from . import paged
from .config import ModelConfig

if TYPE_CHECKING:
    from .model import ForwardBatch, Indexer, SeqSpan

_KEYS_PER_PRODUCT = 16384  # decode: indexer keys per batched product (its fp32 keys and scores stay in L3)
_BLOCK_ELEMS = 1 << 24    # prefill: bound on a [rows, index heads, L] score block and a [rows, topk, 576] gather
E4M3_AS_HALF_SHIFT = 8    # e4m3_as_half(x) == x · 2^-8


def e4m3_as_half(b: torch.Tensor) -> torch.Tensor:
    """e4m3 bytes (uint8 or e4m3) → fp16 holding ``value · 2^-8`` exactly, subnormals included.

    The byte's sign goes to bit 15 and its 7 exponent-mantissa bits to bits 13..7, where fp16 (bias 15
    against e4m3's 7) reads them as the same number scaled by ``2^-8``: three vectorised integer ops,
    several times faster on CPU than torch's element-wise e4m3 conversion."""
    v = b.view(torch.int8).to(torch.int16)  # sign-extended
    return v.bitwise_left_shift_(7).bitwise_and_(-16512).view(torch.float16)  # mask 0xBF80


@dataclass
class Projected:
    """What one MLA layer computed for the step's ``T`` tokens before it attends."""

    q_nope: torch.Tensor                  # [T, H, qk_nope_head_dim]
    q_pe: torch.Tensor                    # [T, H, qk_rope_head_dim], rotated (interleaved)
    c: torch.Tensor                       # [T, kv_lora_rank], the normed latent
    k_pe: torch.Tensor                    # [T, qk_rope_head_dim], rotated (interleaved)
    index_q: torch.Tensor | None = None   # [T, index_n_heads, index_head_dim] fp32 (Hadamard + FP8-rounded in fp8 mode)
    index_w: torch.Tensor | None = None   # [T, index_n_heads] fp32 head weights
    index_k: torch.Tensor | None = None   # [T, index_head_dim], after LayerNorm and RoPE, not Hadamard-rotated


class Attention:
    """What both paths read: the layer's geometry, its ``kv_b_proj`` (``W_UK ‖ W_UV``) and its indexer.

    ``cfg`` is held, not copied: ``index_topk`` is read at every call.
    """

    def __init__(self, cfg: ModelConfig, layer: int, layout: CacheLayout, kv_b_proj: nn.Linear,
                 indexer: Indexer | None):
        self.cfg, self.layer, self.layout = cfg, layer, layout
        self.n_heads, self.nope, self.v_dim = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        self.rank, self.scale = cfg.kv_lora_rank, cfg.softmax_scale
        self.kv_b_proj, self.indexer = kv_b_proj, indexer
        self.short_context_fast_path = True
        """Skip the indexer for a sequence whose context fits in ``index_topk``: its selection is every
        visible token, exactly (tests turn it off to compare with the indexer path bit for bit)."""

    def _uses_indexer(self, context_len: int) -> bool:
        return self.indexer is not None and (context_len > self.cfg.index_topk or not self.short_context_fast_path)

    def store(self, p: Projected, slot_mapping: torch.Tensor, cache) -> None:
        """Write ``p.c``, ``p.k_pe`` (and ``p.index_k``) at ``slot_mapping [T]``; each path has its own
        writer (one fused op on the kernel path), and both write the same bytes."""
        raise NotImplementedError

    def __call__(self, p: Projected, batch: ForwardBatch, cache) -> torch.Tensor:
        """Per-head attention outputs ``[T, H, v_head_dim]`` for every token of ``batch``."""
        raise NotImplementedError


class TorchAttention(Attention):
    def store(self, p: Projected, slot_mapping: torch.Tensor, cache) -> None:
        paged.store_latent(cache.latent[self.layer], slot_mapping, p.c, p.k_pe, self.layout)
        if p.index_k is not None:
            paged.store_index_key(cache.index[self.layer], slot_mapping, p.index_k, self.layout)

    def __call__(self, p: Projected, batch: ForwardBatch, cache) -> torch.Tensor:
        T, dev = p.q_nope.shape[0], p.q_nope.device
        out = torch.empty(T, self.n_heads, self.v_dim, dtype=p.q_nope.dtype, device=dev)
        decode = [i for i, s in enumerate(batch.seqs) if s.num_new == 1]
        if decode:
            rows = torch.tensor([batch.seqs[i].start for i in decode], device=dev)
            idx = None if p.index_q is None else (p.index_q[rows], p.index_w[rows])
            out[rows] = self._decode(p.q_nope[rows], p.q_pe[rows], idx, [batch.seqs[i] for i in decode], cache, batch)
        for s in batch.seqs:
            if s.num_new > 1:
                sl = slice(s.start, s.start + s.num_new)
                idx = None if p.index_q is None else (p.index_q[sl], p.index_w[sl])
                out[sl] = self._prefill(p.q_nope[sl], p.q_pe[sl], idx, s, cache, batch)
        return out

    # -- selection ---------------------------------------------------------------
    def _head_weights(self, iw: torch.Tensor, key_factor: float = 1.0) -> torch.Tensor:
        """``[R, 1, H]``: the head weights with ``index_head_dim^-0.5`` (and a pow2 key factor) folded in,
        applied after the ReLU since positive factors commute with it."""
        return (iw * (self.indexer.head_dim ** -0.5 * key_factor)).unsqueeze(1)

    def _paged_index_scores(self, iq, iw, index_pool, tables, lens, width: int) -> torch.Tensor:
        """``[R, width]`` fp32 indexer scores of each row's paged keys, ``-inf`` from ``lens[r]`` on.

        One batched product per chunk of pages for all rows: the chunk's keys (FP8 bytes widened by
        :func:`e4m3_as_half`, exact) and its ``[R, H, chunk]`` scores stay in cache; the FP8 key scales
        multiply the head-summed score (pow2, exact)."""
        R, ps, lay = iq.shape[0], self.layout.page_size, self.layout
        fp8_mode, n_pages = lay.mode == "fp8", -(-width // ps)
        w = self._head_weights(iw, 2.0 ** E4M3_AS_HALF_SHIFT if fp8_mode else 1.0)
        out = torch.empty(R, n_pages * ps, dtype=torch.float32, device=iq.device)
        step = max(1, _KEYS_PER_PRODUCT // (R * ps))
        for p0 in range(0, n_pages, step):
            raw = index_pool[tables[:, p0:min(n_pages, p0 + step)].clamp_min(0)]  # [R, c, page bytes | page, D]
            n = raw.shape[1] * ps
            if fp8_mode:
                keys = e4m3_as_half(raw[..., :lay.index_scale_offset]).view(R, n, -1).float()
            else:
                keys = raw.view(R, n, -1).float()
            lg = torch.bmm(w, torch.bmm(iq, keys.transpose(1, 2)).relu_()).squeeze(1)  # [R, n]
            if fp8_mode:
                lg *= raw[..., lay.index_scale_offset:].contiguous().view(torch.float32).view(R, n)
            out[:, p0 * ps:p0 * ps + n] = lg
        out = out[:, :width]
        return out.masked_fill_(torch.arange(width, device=out.device)[None, :] >= lens[:, None], float("-inf"))

    def _row_index_scores(self, iq, iw, keys: torch.Tensor) -> torch.Tensor:
        """``[r, L]`` fp32 indexer scores of ``r`` query rows against one sequence's keys ``[L, D]``."""
        return torch.bmm(self._head_weights(iw), torch.matmul(iq, keys.t()).relu_()).squeeze(1)

    @staticmethod
    def _top_positions(scores: torch.Tensor, k: int, last_visible: torch.Tensor) -> torch.Tensor:
        """``[R, k]`` top-``k`` positions of ``scores [R, L]`` in ascending order, ``-1`` past ``last_visible [R]``.

        ``torch.topk`` selects without sorting the context; only the ``k`` winners are sorted, so the
        gather reads the cache in order and a context that fits gives back exactly ``0, 1, ...``
        (the fast path's order: skipping the indexer changes no bit)."""
        pos = scores.topk(min(k, scores.shape[-1]), dim=-1).indices.sort(dim=-1).values
        pos = torch.where(pos <= last_visible[:, None], pos, -1)
        return F.pad(pos, (0, k - pos.shape[-1]), value=-1)

    # -- prefill: MHA over the expanded context while it fits in top-k, then absorbed over the top-k ---------
    def _prefill(self, q_nope, q_pe, idx, s: SeqSpan, cache, batch) -> torch.Tensor:
        n, L, dev = s.num_new, s.context_len, q_nope.device
        pos_ctx = torch.arange(L, device=dev)
        slots = paged.slots_for(s.block_table, pos_ctx, self.layout.page_size)
        q_pos = torch.arange(L - n, L, device=dev)
        # rows [0, m) see at most index_topk tokens: all of them. Rows [m, n) see more: their top-k.
        m = n if idx is None else max(0, min(n, self.cfg.index_topk - (L - n)))
        keys = None
        if idx is not None and (m < n or not self.short_context_fast_path):
            keys = paged.read_index_keys(cache.index[self.layer], slots, self.layout)  # [L, D] fp32, read once
        out = q_nope.new_empty(n, self.n_heads, self.v_dim)
        recorded: list[torch.Tensor] = []
        if m:
            forced = None if self.short_context_fast_path else keys  # the indexer path, for rows that need none
            self._prefill_dense(q_nope[:m], q_pe[:m], idx, forced, q_pos[:m], slots, cache, batch, out[:m], recorded)
        if m < n:
            self._prefill_sparse(q_nope[m:], q_pe[m:], (idx[0][m:], idx[1][m:]), keys, q_pos[m:], slots, cache, batch,
                                 out[m:], recorded)
        if batch.record_topk is not None:
            batch.record_topk.append((self.layer, s, torch.cat([F.pad(v, (0, L - v.shape[1])) for v in recorded])))
        return out

    def _prefill_dense(self, q_nope, q_pe, idx, keys, q_pos, slots, cache, batch, out, recorded) -> None:
        """Rows whose visible context fits in top-k (every row without an indexer): MHA with ``kv_b_proj``
        expanded over the visible prefix, queries in blocks that bound the ``[H, block, Lx]`` scores."""
        m, H, Lx = q_nope.shape[0], self.n_heads, int(q_pos[-1]) + 1
        lat = paged.read_latent(cache.latent[self.layer], slots[:Lx], self.layout, q_nope.dtype)  # [Lx, 576]
        kv = self.kv_b_proj(lat[:, : self.rank]).view(Lx, H, self.nope + self.v_dim)
        k_nope, v, kpe = kv[..., : self.nope], kv[..., self.nope:], lat[:, self.rank:]
        pos = torch.arange(Lx, device=q_nope.device)
        block = batch.query_block or m
        for a in range(0, m, block):
            b = min(m, a + block)
            visible = pos[None, :] <= q_pos[a:b, None]  # [b - a, Lx] causal
            if keys is not None:  # the indexer path (fast path off): it selects every visible token
                sc = self._row_index_scores(idx[0][a:b], idx[1][a:b], keys[:Lx]).masked_fill_(~visible, float("-inf"))
                sel = self._top_positions(sc, self.cfg.index_topk, q_pos[a:b])
                visible = visible & torch.zeros(b - a, Lx + 1, dtype=torch.bool, device=pos.device).scatter_(
                    1, torch.where(sel >= 0, sel, Lx), True)[:, :Lx]
            if batch.record_topk is not None:
                recorded.append(visible)
            scores = (torch.einsum("nhd,lhd->hnl", q_nope[a:b], k_nope)
                      + torch.einsum("nhr,lr->hnl", q_pe[a:b], kpe)) * self.scale
            scores = scores.masked_fill(~visible[None], float("-inf"))
            p = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            out[a:b] = torch.einsum("hnl,lhd->nhd", p, v)

    def _prefill_sparse(self, q_nope, q_pe, idx, keys, q_pos, slots, cache, batch, out, recorded) -> None:
        """Rows that see more than top-k tokens: indexer scores against the sequence's keys, top-k, then
        absorbed MLA over the gathered top-k latent rows only, in row blocks that bound the
        ``[rows, H_index, L]`` scores and the ``[rows, topk, 576]`` gather."""
        r, L, k = q_nope.shape[0], keys.shape[0], self.cfg.index_topk
        step = max(1, min(_BLOCK_ELEMS // (idx[0].shape[1] * L), _BLOCK_ELEMS // (k * self.layout.latent_dim)))
        step = min(step, batch.query_block or step)
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        pos = torch.arange(L, device=q_nope.device)
        for a in range(0, r, step):
            b = min(r, a + step)
            sc = self._row_index_scores(idx[0][a:b], idx[1][a:b], keys)
            sc.masked_fill_(pos[None, :] > q_pos[a:b, None], float("-inf"))
            sel = self._top_positions(sc, k, q_pos[a:b])  # [rows, k]
            if batch.record_topk is not None:
                recorded.append(torch.zeros(b - a, L + 1, dtype=torch.bool, device=pos.device).scatter_(
                    1, torch.where(sel >= 0, sel, L), True)[:, :L])
            out[a:b] = self._absorbed(q_nope[a:b], q_pe[a:b], slots[sel.clamp_min(0)], sel >= 0, cache, w)

    def _absorbed(self, q_nope, q_pe, slots, ok, cache, w) -> torch.Tensor:
        """Absorbed MLA of ``R`` query rows, each over its own ``[R, K]`` cache ``slots`` (``ok``: attended):
        ``q = [q_nope·W_UK ‖ q_pe]`` against the gathered ``[c ‖ k_pe]`` rows, ``o = o_lat·W_UVᵀ``."""
        lat = paged.read_latent(cache.latent[self.layer], slots, self.layout, q_nope.dtype)  # [R, K, 576]
        q_abs = torch.cat([torch.einsum("bhd,hdc->bhc", q_nope, w[:, : self.nope]), q_pe], dim=-1)  # [R, H, 576]
        scores = torch.bmm(q_abs, lat.transpose(1, 2)) * self.scale  # [R, H, K]
        scores.masked_fill_(~ok[:, None, :], float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(q_nope.dtype)
        o_lat = torch.bmm(p, lat[..., : self.rank])
        return torch.einsum("bhc,hdc->bhd", o_lat, w[:, self.nope:])

    # -- decode: absorbed MLA in latent space, batched, over the selected rows only ------------------------------
    def _decode(self, q_nope, q_pe, idx, seqs: list[SeqSpan], cache, batch) -> torch.Tensor:
        dev, ps = q_nope.device, self.layout.page_size
        lens = torch.tensor([s.context_len for s in seqs], device=dev)
        Lmax = int(lens.max())
        tables = torch.nn.utils.rnn.pad_sequence([s.block_table for s in seqs], batch_first=True, padding_value=0)
        indexed = [] if idx is None else [b for b, s in enumerate(seqs) if self._uses_indexer(s.context_len)]
        width = min(self.cfg.index_topk, Lmax) if indexed else Lmax
        pos = torch.arange(width, device=dev)
        sel = torch.where(pos[None, :] < lens[:, None], pos[None, :], -1)  # [B, width]: all visible (contexts that fit)
        if indexed:
            rows = torch.tensor(indexed, device=dev)
            scores = self._paged_index_scores(idx[0][rows], idx[1][rows], cache.index[self.layer], tables[rows],
                                              lens[rows], max(seqs[b].context_len for b in indexed))
            sel[rows] = self._top_positions(scores, width, lens[rows] - 1)
        ok = sel >= 0
        p = sel.clamp_min(0)
        slots = tables.gather(1, p // ps) * ps + p % ps
        if batch.record_topk is not None:
            for b, s in enumerate(seqs):
                vis = torch.zeros(1, s.context_len, dtype=torch.bool, device=dev)
                vis[0, sel[b][ok[b]]] = True
                batch.record_topk.append((self.layer, s, vis))
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        return self._absorbed(q_nope, q_pe, slots, ok, cache, w)
