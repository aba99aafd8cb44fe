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

:class:`TorchAttention` (here) is the reference, in plain torch over the engine's own
cache accessors (``paged``): prefill as MHA with ``kv_b_proj`` expanded per head,
decode absorbed in the 512-d latent space. ``KernelAttention`` (attention_kernels.py)
runs the same steps through the ``dsv32_kernels`` ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from dsv32_kernels.layout import CacheLayout
from . import paged
from .config import ModelConfig

if TYPE_CHECKING:
    from .model import ForwardBatch, Indexer, SeqSpan


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
    def _select(self, iq, iw, index_pool, slots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor | None:
        """Top-k logical positions per query, or None when every visible token fits in top-k."""
        topk = self.cfg.index_topk
        if self.indexer is None or slots.shape[-1] <= topk:
            return None
        keys = paged.read_index_keys(index_pool, slots, self.layout)
        scores = self.indexer.scores(iq, iw, keys).masked_fill(~visible, float("-inf"))
        return scores.topk(topk, dim=-1).indices

    # -- prefill: MHA over the expanded context ----------------------------------------
    def _prefill(self, q_nope, q_pe, idx, s: SeqSpan, cache, batch) -> torch.Tensor:
        n, L, H = s.num_new, s.context_len, self.n_heads
        pos_ctx = torch.arange(L, device=q_nope.device)
        slots = paged.slots_for(s.block_table, pos_ctx, self.layout.page_size)
        lat = paged.read_latent(cache.latent[self.layer], slots, self.layout, q_nope.dtype)  # [L, 576]
        c_ctx, kpe_ctx = lat[:, : self.rank], lat[:, self.rank:]
        kv = self.kv_b_proj(c_ctx).view(L, H, self.nope + self.v_dim)
        k_nope, v = kv[..., : self.nope], kv[..., self.nope:]
        # Queries go in blocks so that the [H, block, L] scores stay bounded for long prompts; the
        # whole prompt still runs layer by layer, so each layer's cache can be shipped when it is done.
        block = batch.query_block or n
        out = q_nope.new_empty(n, H, self.v_dim)
        recorded: list[torch.Tensor] = []
        for a in range(0, n, block):
            b = min(n, a + block)
            q_pos = torch.arange(L - n + a, L - n + b, device=q_nope.device)
            visible = pos_ctx[None, :] <= q_pos[:, None]  # [b - a, L] causal
            sel = None if idx is None else self._select(idx[0][a:b], idx[1][a:b], cache.index[self.layer], slots, visible)
            if sel is not None:
                visible = visible & torch.zeros_like(visible).scatter_(1, sel, True)
            if batch.record_topk is not None:
                recorded.append(visible.clone())
            scores = (torch.einsum("nhd,lhd->hnl", q_nope[a:b], k_nope)
                      + torch.einsum("nhr,lr->hnl", q_pe[a:b], kpe_ctx)) * self.scale
            scores = scores.masked_fill(~visible[None], float("-inf"))
            p = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            out[a:b] = torch.einsum("hnl,lhd->nhd", p, v)
        if recorded:
            batch.record_topk.append((self.layer, s, torch.cat(recorded)))
        return out

    # -- decode: absorbed MLA in latent space, batched ---------------------------------
    def _decode(self, q_nope, q_pe, idx, seqs: list[SeqSpan], cache, batch) -> torch.Tensor:
        B, H, dev, ps = len(seqs), self.n_heads, q_nope.device, self.layout.page_size
        lens = torch.tensor([s.context_len for s in seqs], device=dev)
        Lmax = int(lens.max())
        pos = torch.arange(Lmax, device=dev)
        tables = torch.nn.utils.rnn.pad_sequence([s.block_table for s in seqs], batch_first=True, padding_value=0)
        ctx_slots = tables.gather(1, (pos // ps).clamp_max(tables.shape[1] - 1).expand(B, -1)) * ps + pos % ps
        visible = pos[None, :] < lens[:, None]  # [B, Lmax]
        sel_pos = None
        if idx is not None and Lmax > self.cfg.index_topk:
            keys = paged.read_index_keys(cache.index[self.layer], ctx_slots, self.layout)  # [B, Lmax, D]
            scores = self.indexer.scores(idx[0], idx[1], keys).masked_fill(~visible, float("-inf"))
            k = self.cfg.index_topk
            sel_pos = scores.topk(k, dim=-1).indices                      # [B, k]
            sel_ok = visible.gather(1, sel_pos)                           # short contexts: pad picks are invisible
            slots = ctx_slots.gather(1, sel_pos)
        else:
            slots, sel_ok = ctx_slots, visible
        if batch.record_topk is not None:
            for b, s in enumerate(seqs):
                vis = torch.zeros(1, s.context_len, dtype=torch.bool, device=dev)
                p = (sel_pos[b] if sel_pos is not None else pos)[sel_ok[b]]
                vis[0, p] = True
                batch.record_topk.append((self.layer, s, vis))
        lat = paged.read_latent(cache.latent[self.layer], slots, self.layout, q_nope.dtype)  # [B, K, 576]
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.rank)
        q_lat = torch.einsum("bhd,hdc->bhc", q_nope, w[:, : self.nope])
        scores = (torch.einsum("bhc,bkc->bhk", q_lat, lat[..., : self.rank])
                  + torch.einsum("bhr,bkr->bhk", q_pe, lat[..., self.rank:])) * self.scale
        scores = scores.masked_fill(~sel_ok[:, None, :], float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(q_nope.dtype)
        o_lat = torch.einsum("bhk,bkc->bhc", p, lat[..., : self.rank])
        return torch.einsum("bhc,hdc->bhd", o_lat, w[:, self.nope:])
