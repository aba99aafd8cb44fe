"""YaRN rotary embeddings with DeepSeek's two conventions (spec §3.2).

MLA rotates interleaved pairs ``(x[2i], x[2i+1])`` in place (the layout the
cache and FlashMLA use); the lightning indexer rotates half-split pairs
``(x[i], x[i + d/2])``. Mixing them up was the 2025-11 indexer bug.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the RoPE dims and the cos/sin scaling factor."""
    d, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    inv_extra = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if not rs:
        return inv_extra, 1.0
    factor = float(rs["factor"])
    orig = int(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

    def correction_dim(rot: float) -> float:
        return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra_weight = 1 - ramp
    inv = (inv_extra / factor) * (1 - extra_weight) + inv_extra * extra_weight

    def mscale(scale: float, m: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    attn = rs.get("attention_factor")
    if attn is None:
        attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor, 1.0)
    return inv, float(attn)


class Rotary:
    """cos/sin per position, computed on demand and cached by length."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu"):
        self.inv_freq, self.scale = yarn_inv_freq(cfg)
        self.inv_freq = self.inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, d/2]
        return (freqs.cos() * self.scale).to(dtype), (freqs.sin() * self.scale).to(dtype)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # cos/sin are [T, d/2]; x is [T, d] or [T, H, d]
    return t if x.dim() == 2 else t.unsqueeze(1)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """MLA: rotate ``(x[2i], x[2i+1])`` by angle i, written back to the same slots."""
    c, s = _bcast(cos, x), _bcast(sin, x)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return out.flatten(-2)


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Indexer: rotate ``(x[i], x[i + d/2])`` by angle i (NeoX style)."""
    c, s = _bcast(cos, x), _bcast(sin, x)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
