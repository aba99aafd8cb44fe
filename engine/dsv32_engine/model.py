"""DeepSeek-V3.2: MLA + DeepSeek Sparse Attention + MoE (spec §2–§5).

Module and parameter names mirror the HF checkpoint (``model.layers.N.self_attn.q_a_proj``
…) so that loading is a name lookup. Routed experts are stacked in memory
(``[E, out, in]``) and one entry per expert on disk.

A forward runs a flattened ``ForwardBatch``: every sequence contributes its new
tokens. Each layer's ``MLA`` projects them, writes them into its cache, then
each sequence attends over its whole paged context through the layer's
attention object (``attention.py``: the torch path, labelled **prefill** — MHA
with ``kv_b_proj`` expanded per head — and **decode** — absorbed MLA in the 512-d
latent space, batched; ``attention_kernels.py``: the same through the
``dsv32_kernels`` ops), chosen once when the model is built. With an indexer, a
query whose visible context exceeds ``index_topk`` attends to the top-k tokens
chosen by the lightning indexer only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv32_kernels import fp8
from dsv32_kernels.layout import CacheLayout
from .attention import Attention, Projected, TorchAttention
from .attention_kernels import KernelAttention
from .config import ModelConfig
from .fp8_linear import Linear
from .moe import MLP, MoE
from .parallel import EPGroup, ExpertPlacement
from .rope import Rotary, rope_half, rope_interleaved

# attention_backend name -> the attention path of every MLA layer (checked when the model is built)
ATTENTION_BACKENDS: dict[str, type[Attention]] = {"torch": TorchAttention, "kernels": KernelAttention}


def resolve_backend(name: str | None, device: torch.device | str) -> str:
    """The default attention backend when none is named: ``kernels`` on CUDA, ``torch`` elsewhere."""
    if name is not None:
        return name
    return "kernels" if torch.device(device).type == "cuda" else "torch"


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


def _linear(i: int, o: int) -> Linear:
    return Linear(i, o)  # bias-free; FP8 + weight_scale_inv when the loader keeps a checkpoint's FP8 weights


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
    """Multi-head latent attention: the projections here, the attention itself in ``self.attention``."""

    def __init__(self, cfg: ModelConfig, layer: int, layout: CacheLayout, attention: type[Attention]):
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
        self.attention = attention(cfg, layer, layout, self.kv_b_proj, self.indexer)  # holds no parameters

    def project(self, x, cos, sin) -> Projected:
        """Queries, the latent ``c`` and ``k_pe`` to cache, and the indexer's query, weights and key."""
        T, H = x.shape[0], self.n_heads
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(T, H, self.nope + self.rope)
        kv = self.kv_a_proj_with_mqa(x)
        p = Projected(q[..., : self.nope], rope_interleaved(q[..., self.nope:], cos, sin),
                      self.kv_a_layernorm(kv[:, : self.rank]), rope_interleaved(kv[:, self.rank:], cos, sin))
        if self.indexer is not None:
            p.index_q, p.index_w, p.index_k = self.indexer.project(x, qr, cos, sin, self.layout.mode == "fp8")
        return p

    def forward(self, x, cos, sin, batch: ForwardBatch, cache) -> torch.Tensor:
        p = self.project(x, cos, sin)
        self.attention.store(p, batch.slot_mapping, cache)
        if batch.on_layer_done is not None:
            batch.on_layer_done(self.layer)
        out = self.attention(p, batch, cache)  # [T, H, v_head_dim]
        return self.o_proj(out.view(x.shape[0], self.n_heads * self.v_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, layout: CacheLayout, attention: type[Attention],
                 ep: EPGroup | None = None, placement: ExpertPlacement | None = None):
        super().__init__()
        self.self_attn = MLA(cfg, layer, layout, attention)
        self.mlp = MoE(cfg, ep, placement) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, batch, cache):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: CacheLayout, attention: type[Attention], ep: EPGroup | None = None,
                 placement: ExpertPlacement | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, layout, attention, ep, placement)
                                     for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV32ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: CacheLayout, attention_backend: str = "torch",
                 ep: EPGroup | None = None, placement: ExpertPlacement | None = None):
        super().__init__()
        self.config, self.layout = cfg, layout
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {tuple(ATTENTION_BACKENDS)}, got {attention_backend!r}")
        self.model = Backbone(cfg, layout, ATTENTION_BACKENDS[attention_backend], ep, placement)
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

    @torch.inference_mode()
    def idle_forward(self) -> None:
        """An expert-parallel rank with no tokens this step: the MoE layers' collectives with zero rows,
        in layer order, as a forward would run them (no attention, no cache)."""
        x = self.lm_head.weight.new_empty((0, self.config.hidden_size))
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp(x)
