"""The MoE block: noaux_tc gate, routed experts (all local, or sharded over an EP group), shared experts.

With expert parallelism (an :class:`~.parallel.EPGroup`), one MoE layer on one rank:

1. gate its own tokens → ``(token, slot)`` pairs, each naming an expert;
2. sort the pairs by the rank that owns their expert and exchange the counts;
3. dispatch: ``all_to_all`` the pairs' hidden rows (and their experts' local ids);
4. run the local experts on what arrived (the same batched GEMMs as without EP);
5. combine: ``all_to_all`` the outputs back, undo the sort, weight by the
   routing weights and sum over the slots — in the same slot order as without
   EP, so only the GEMMs' summation order can differ.

A rank with no tokens still takes part (zero rows): see the lockstep in
:mod:`.parallel`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fp8_linear import Linear, expert_matmul
from .parallel import EPGroup, ExpertPlacement


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter)
        self.up_proj = Linear(hidden, inter)
        self.down_proj = Linear(inter, hidden)

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
    """The routed experts this rank holds, stacked: ``[local experts, ...]`` (all of them without EP).

    Each projection is in the compute dtype, or FP8 as stored with its ``*_scale_inv``
    ``[E, ceil(out/128), ceil(in/128)]`` beside it (set by the loader: ``weight_format="fp8"``).
    """

    PROJS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, cfg: ModelConfig, num_local: int | None = None):
        super().__init__()
        E, I, D = num_local or cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        for name in self.PROJS:
            self.register_parameter(f"{name}_scale_inv", None)

    def run(self, rows: torch.Tensor, expert: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        """Pair p runs local expert ``expert[p]`` on row ``rows[src[p]]`` (``rows[p]`` without ``src``)
        → outputs ``[pairs, D]`` (unweighted).

        Rows are grouped by expert into ``[active experts, max rows per expert, D]`` (zero padded):
        a handful of large matmuls instead of three small ones per expert, which keeps decode steps cheap.
        """
        if expert.numel() == 0:
            return rows.new_empty((0, rows.shape[-1]))
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.gate_proj.shape[0])
        active = torch.nonzero(counts).squeeze(1)                       # [A]
        slot_of_expert = torch.full_like(counts, -1)
        slot_of_expert[active] = torch.arange(active.numel(), device=rows.device)
        e_sorted = expert[order]
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(expert.numel(), device=rows.device) - starts[e_sorted]
        buf = rows.new_zeros(active.numel(), int(counts.max()), rows.shape[-1])  # [A, M, D]
        buf[slot_of_expert[e_sorted], pos] = rows[order if src is None else src[order]]
        h = (F.silu(expert_matmul(buf, self.gate_proj, self.gate_proj_scale_inv, active))
             * expert_matmul(buf, self.up_proj, self.up_proj_scale_inv, active))
        o = expert_matmul(h, self.down_proj, self.down_proj_scale_inv, active)  # [A, M, D]
        out = rows.new_empty((expert.numel(), rows.shape[-1]))
        out[order] = o[slot_of_expert[e_sorted], pos]
        return out

    def forward(self, x, idx, w) -> torch.Tensor:
        """All experts local: ``x [T, D]``, ``idx``/``w [T, k]`` → ``[T, D]``."""
        T, k = idx.shape
        pair_token = torch.arange(T * k, device=x.device) // k
        per_slot = self.run(x, idx.reshape(-1), pair_token)             # token-major [T*k, D]
        return (per_slot.view(T, k, x.shape[-1]) * w.unsqueeze(-1).to(x.dtype)).sum(1)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, ep: EPGroup | None = None, placement: ExpertPlacement | None = None):
        super().__init__()
        self.ep = ep
        if ep is not None:
            assert placement is not None and placement.ep_size == ep.size
            owner, local = placement.tables(ep.device)  # real tensors even when the model is built on meta
            self.register_buffer("owner", owner, persistent=False)
            self.register_buffer("local_index", local, persistent=False)
            num_local = len(placement.local_experts(ep.rank))
        else:
            num_local = None
        self.gate = Gate(cfg)
        self.experts = Experts(cfg, num_local)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * (cfg.n_shared_experts or 0)) \
            if cfg.n_shared_experts else None

    def forward(self, x):
        idx, w = self.gate(x)
        y = self.experts(x, idx, w) if self.ep is None else self._expert_parallel(x, idx, w)
        return y + self.shared_experts(x) if self.shared_experts is not None else y

    def _expert_parallel(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ep = self.ep
        t = time.perf_counter() if ep.profile else 0.0
        T, k = idx.shape
        flat = idx.reshape(-1)                                            # [T*k] global expert ids
        dest = self.owner[flat]
        order = torch.argsort(dest, stable=True)                          # pairs grouped by owning rank
        send = torch.bincount(dest, minlength=ep.size)
        recv = ep.exchange_counts(send)
        send_l, recv_l = send.tolist(), recv.tolist()
        ep.remote_rows += sum(send_l) - send_l[ep.rank]
        rows = ep.all_to_all(x[order // k], send_l, recv_l)               # [R, D] pairs for my experts
        expert = ep.all_to_all(self.local_index[flat[order]], send_l, recv_l)
        t = ep.timed("dispatch", t)
        out = self.experts.run(rows, expert)
        t = ep.timed("experts", t)
        back = ep.all_to_all(out, recv_l, send_l)                         # [T*k, D], sorted by rank
        per_slot = torch.empty_like(back)
        per_slot[order] = back
        y = (per_slot.view(T, k, x.shape[-1]) * w.unsqueeze(-1).to(x.dtype)).sum(1)
        ep.timed("combine", t)
        return y
