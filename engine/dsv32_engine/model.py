"""DeepSeek-V3.2: MLA + DeepSeek Sparse Attention + MoE (spec §2–§5).

Module and parameter names mirror the HF checkpoint (``model.layers.N.self_attn.q_a_proj``
…) so that loading is a name lookup. Routed experts are stacked in memory
(``[E, out, in]``) and one entry per expert on disk.

A forward runs a flattened ``ForwardBatch``: every sequence contributes its new
tokens; the cache of each layer is written first, then each sequence attends
over its whole paged context. Sequences with one new token take the **decode**
path (absorbed MLA in the 512-d latent space, batched); the others take the
**prefill** path (MHA with ``kv_b_proj`` expanded per head). With an indexer,
a query whose visible context exceeds ``index_topk`` attends to the top-k
tokens chosen by the lightning indexer only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv32_kernels import fp8
from . import paged
from .config import ModelConfig
from dsv32_kernels.layout import CacheLayout
from .rope import Rotary, rope_half, rope_interleaved


@dataclass
class SeqSpan:
    """One sequence's share of a flattened batch."""

    start: int          # offset of its new tokens in the flat token axis
    num_new: int        # new tokens this step
    context_len: int    # cached tokens after this step (prefix + new)
    block_table: torch.Tensor  # [pages] int64


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor     # [T]
    positions: torch.Tensor     # [T]
    slot_mapping: torch.Tensor  # [T]
    seqs: list[SeqSpan]
    logits_indices: torch.Tensor  # token rows whose logits are wanted
    on_layer_done: Callable[[int], None] | None = None
    query_block: int | None = None  # prefill attention in blocks of this many queries (bounded memory)
    # filled by the forward when asked: per layer, per sequence, the selected logical positions
    record_topk: list | None = field(default=None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _linear(i: int, o: int) -> nn.Linear:
    return nn.Linear(i, o, bias=False)


class Indexer(nn.Module):
    """Lightning indexer: ``I[t,s] = Σ_h w[t,h] · ReLU(q[t,h]·k[s])`` (spec §3.4)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.wq_b = _linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = _linear(cfg.hidden_size, self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = _linear(cfg.hidden_size, self.n_heads)  # kept in fp32

    def project(self, x, qr, cos, sin, fp8_mode: bool):
        """Queries ``[T, H, D]`` (fp32, rotated+FP8-rounded in fp8 mode), head weights ``[T, H]``, keys ``[T, D]``."""
        T = x.shape[0]
        q = self.wq_b(qr).view(T, self.n_heads, self.head_dim)
        q = torch.cat([rope_half(q[..., : self.rope_dim], cos, sin), q[..., self.rope_dim:]], dim=-1)
        k = self.k_norm(self.wk(x))
        k = torch.cat([rope_half(k[..., : self.rope_dim], cos, sin), k[..., self.rope_dim:]], dim=-1)
        w = F.linear(x.float(), self.weights_proj.weight.float()) * (self.n_heads ** -0.5)
        q = q.float()
        if fp8_mode:  # Hadamard then FP8 per head vector; scales fold back in (positive, commute with ReLU)
            q = fp8.fake_quant(fp8.hadamard(q))
        return q, w, k

    def scores(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``q [n, H, D]``, ``w [n, H]``, ``keys [..., L, D]`` → ``[n, L]`` (or batched ``[B, L]`` for n=B)."""
        if keys.dim() == 2:
            s = F.relu(torch.einsum("nhd,ld->nhl", q, keys) * self.head_dim ** -0.5)
            return torch.einsum("nh,nhl->nl", w, s)
        s = F.relu(torch.einsum("bhd,bld->bhl", q, keys) * self.head_dim ** -0.5)
        return torch.einsum("bh,bhl->bl", w, s)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, layout: CacheLayout):
        super().__init__()
        self.cfg, self.layer, self.layout = cfg, layer, layout
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim, self.rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.q_a_proj = _linear(cfg.hidden_size, cfg.q_lora_rank)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = _linear(cfg.q_lora_rank, self.n_heads * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = _linear(cfg.hidden_size, self.rank + self.rope)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = _linear(self.rank, self.n_heads * (self.nope + self.v_dim))
        self.o_proj = _linear(self.n_heads * self.v_dim, cfg.hidden_size)
        self.indexer = Indexer(cfg) if cfg.has_indexer else None
        self.kernel_path = False  # attention through dsv32_kernels (attention_kernels.py); set by EngineCore

    def forward(self, x, cos, sin, batch: ForwardBatch, cache) -> torch.Tensor:
        if self.kernel_path:
            from . import attention_kernels
            return attention_kernels.forward(self, x, cos, sin, batch, cache)
        T, H = x.shape[0], self.n_heads
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(T, H, self.nope + self.rope)
        q_nope, q_pe = q[..., : self.nope], rope_interleaved(q[..., self.nope:], cos, sin)
        kv = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(kv[:, : self.rank])
        k_pe = rope_interleaved(kv[:, self.rank:], cos, sin)
        fp8_mode = self.layout.mode == "fp8"
        paged.store_latent(cache.latent[self.layer], batch.slot_mapping, c, k_pe, self.layout)
        iq = iw = None
        if self.indexer is not None:
            iq, iw, ik = self.indexer.project(x, qr, cos, sin, fp8_mode)
            paged.store_index_key(cache.index[self.layer], batch.slot_mapping, ik, self.layout)
        if batch.on_layer_done is not None:
            batch.on_layer_done(self.layer)

        out = torch.empty(T, H, self.v_dim, dtype=x.dtype, device=x.device)
        decode = [i for i, s in enumerate(batch.seqs) if s.num_new == 1]
        if decode:
            rows = torch.tensor([batch.seqs[i].start for i in decode], device=x.device)
            out[rows] = self._decode(q_nope[rows], q_pe[rows], None if iq is None else (iq[rows], iw[rows]),
                                     [batch.seqs[i] for i in decode], cache, batch)
        for s in batch.seqs:
            if s.num_new > 1:
                sl = slice(s.start, s.start + s.num_new)
                idx = None if iq is None else (iq[sl], iw[sl])
                out[sl] = self._prefill(q_nope[sl], q_pe[sl], idx, s, cache, batch)
        return self.o_proj(out.view(T, H * self.v_dim))

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


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = _linear(hidden, inter), _linear(hidden, inter), _linear(inter, hidden)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """noaux_tc routing: sigmoid scores, bias for selection only, group-limited top-k (spec §5)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        biased = scores + self.e_score_correction_bias.float()
        T, E, G = x.shape[0], cfg.n_routed_experts, cfg.n_group
        group = biased.view(T, G, E // G).topk(min(2, E // G), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group, dtype=torch.bool).scatter_(1, group.topk(cfg.topk_group, dim=-1).indices, True)
        biased = biased.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
        idx = biased.topk(cfg.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * cfg.routed_scaling_factor


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x, idx, w) -> torch.Tensor:
        """Group the (token, slot) pairs by expert and run all active experts as three batched GEMMs.

        Pairs are packed into ``[active experts, max pairs per expert, D]`` (zero padded): a handful of
        large matmuls instead of three small ones per expert, which is what keeps decode steps cheap.
        """
        T, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0])
        active = torch.nonzero(counts).squeeze(1)                       # [A]
        slot_of_expert = torch.full_like(counts, -1)
        slot_of_expert[active] = torch.arange(active.numel(), device=idx.device)
        e_sorted = flat[order]
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(flat.numel(), device=idx.device) - starts[e_sorted]
        buf = x.new_zeros(active.numel(), int(counts.max()), x.shape[-1])  # [A, M, D]
        buf[slot_of_expert[e_sorted], pos] = x[order // k]
        h = F.silu(torch.bmm(buf, self.gate_proj[active].transpose(1, 2))) * torch.bmm(buf, self.up_proj[active].transpose(1, 2))
        o = torch.bmm(h, self.down_proj[active].transpose(1, 2))          # [A, M, D]
        per_slot = torch.empty(flat.numel(), x.shape[-1], dtype=x.dtype, device=x.device)
        per_slot[order] = o[slot_of_expert[e_sorted], pos]                # back to token-major [T*k, D]
        return (per_slot.view(T, k, -1) * w.unsqueeze(-1).to(x.dtype)).sum(1)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * (cfg.n_shared_experts or 0)) \
            if cfg.n_shared_experts else None

    def forward(self, x):
        idx, w = self.gate(x)
        y = self.experts(x, idx, w)
        return y + self.shared_experts(x) if self.shared_experts is not None else y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, layout: CacheLayout):
        super().__init__()
        self.self_attn = MLA(cfg, layer, layout)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, batch, cache):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: CacheLayout):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, layout) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV32ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: CacheLayout):
        super().__init__()
        self.config, self.layout = cfg, layout
        self.model = Backbone(cfg, layout)
        self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary: Rotary | None = None

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache) -> torch.Tensor:
        """Logits ``[len(batch.logits_indices), vocab]`` in fp32."""
        if self.rotary is None:
            self.rotary = Rotary(self.config, self.lm_head.weight.device)
        x = self.model.embed_tokens(batch.input_ids)
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch, cache)
        x = self.model.norm(x[batch.logits_indices])
        return self.lm_head(x).float()
