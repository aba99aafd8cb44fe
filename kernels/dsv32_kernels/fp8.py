"""FP8 e4m3 arithmetic shared by the engine, the checkpoint tools and the kernels' torch twins.

Conventions (spec §3.4, §6.2, §6.3, §8):
* activations / cache values: one scale per 128-value block, rounded up to a
  power of two (ue8m0): ``s = 2^ceil(log2(max(amax, 1e-4) / 448))``; stored
  values are ``clamp(x / s, ±448)`` in e4m3 and ``x ≈ q · s``;
* weights: 128×128 blocks, ``weight_scale_inv`` is a multiplier: ``W = Wq · s``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import FP8_TILE, CacheLayout

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """Power-of-two scale that maps ``amax`` into the e4m3 range.

    Computed on the fp32 bits (exponent, +1 if any mantissa bit is set), as REF's
    ``fast_log2_ceil`` does: ``log2`` in fp32 rounds ``2^k·(1+ε)`` down to ``k``
    and would give a scale below ``amax/448``; the bit form is exact and is what
    the Triton kernels compute too.
    """
    y = amax.float().clamp_min(AMAX_FLOOR) / FP8_MAX
    bits = y.view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp.clamp_max(254) << 23).view(torch.float32)


def quant_blocks(x: torch.Tensor, block: int = FP8_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the last dim in blocks of ``block`` values: ``(q [..., n] e4m3, s [..., n/block] fp32)``."""
    *lead, n = x.shape
    if n % block:
        raise ValueError(f"last dim {n} is not a multiple of the FP8 block {block}")
    xb = x.float().reshape(*lead, n // block, block)
    s = pow2_scale(xb.abs().amax(dim=-1))
    q = (xb / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(*lead, n), s


def dequant_blocks(q: torch.Tensor, s: torch.Tensor, block: int = FP8_TILE) -> torch.Tensor:
    *lead, n = q.shape
    return (q.float().reshape(*lead, n // block, block) * s.unsqueeze(-1)).reshape(*lead, n)


def fake_quant(x: torch.Tensor, block: int = FP8_TILE) -> torch.Tensor:
    """Round-trip through FP8 (what REF does to the latent before caching)."""
    return dequant_blocks(*quant_blocks(x, block), block).to(x.dtype)


_HADAMARD: dict[tuple[int, torch.device], torch.Tensor] = {}


def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal Sylvester Walsh–Hadamard matrix (``H @ H.T == I``)."""
    key = (n, torch.device(device))
    if key not in _HADAMARD:
        if n & (n - 1):
            raise ValueError(f"Hadamard size must be a power of two, got {n}")
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = (h / math.sqrt(n)).to(device)
    return _HADAMARD[key]


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim; preserves dot products, spreads outliers before FP8."""
    h = hadamard_matrix(x.shape[-1], x.device)
    return (x.float() @ h).to(x.dtype)


# -- the 656-byte FlashMLA latent record (spec §6.2) -------------------------------
def pack_latent(c: torch.Tensor, k_pe: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """``c [..., 512]``, ``k_pe [..., 64]`` → ``uint8 [..., 656]``."""
    q, s = quant_blocks(c)
    rope = k_pe.to(torch.bfloat16).contiguous()
    # through a flat copy: an empty [0, 1] scale tensor may carry stride 0 in its last dim, which view(uint8) refuses
    s_bytes = s.reshape(-1).view(torch.uint8).reshape(*s.shape[:-1], 4 * s.shape[-1])
    parts = [q.view(torch.uint8), s_bytes, rope.view(torch.uint8)]
    out = torch.cat(parts, dim=-1)
    assert out.shape[-1] == layout.latent_token_bytes
    return out


def unpack_latent(rec: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """``uint8 [..., 656]`` → dequantised ``float32 [..., 576]`` (``[c ‖ k_pe]``)."""
    rec = rec.contiguous()
    q = rec[..., : layout.kv_lora_rank].view(FP8)
    s = rec[..., layout.latent_scale_offset : layout.latent_rope_offset].contiguous().view(torch.float32)
    rope = rec[..., layout.latent_rope_offset :].contiguous().view(torch.bfloat16)
    return torch.cat([dequant_blocks(q, s), rope.float()], dim=-1)


# -- the 8448-byte DeepGEMM indexer page (spec §6.3) --------------------------------
def index_page_views(pool: torch.Tensor, layout: CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of an fp8 index pool ``[P, 8448]`` as keys ``[P, 64, 128]`` e4m3 and scales ``[P, 64]`` fp32."""
    n = layout.index_scale_offset
    keys = pool[:, :n].view(FP8).view(pool.shape[0], layout.page_size, layout.index_head_dim)
    scales = pool[:, n:].view(torch.float32)
    return keys, scales


# -- block-scaled FP8 weights (spec §8) ------------------------------------------------
def quant_weight(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` → (e4m3 weight, fp32 ``weight_scale_inv`` ``[ceil(out/128), ceil(in/128)]``)."""
    out_f, in_f = w.shape
    po, pi = -(-out_f // block) * block, -(-in_f // block) * block
    wp = torch.zeros(po, pi, dtype=torch.float32)
    wp[:out_f, :in_f] = w.float()
    blocks = wp.view(po // block, block, pi // block, block)
    s = pow2_scale(blocks.abs().amax(dim=(1, 3)))
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(po, pi)[:out_f, :in_f].contiguous(), s


def _e4m3_bits(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2^-120`` × the e4m3fn values, exactly, as float32 or bfloat16: the code sign-extended, shifted so that its
    7 magnitude bits sit at the target's exponent field, and masked to those and the sign (subnormal codes become
    the target's denormals; NaN codes, absent from weights, become ±480 · 2^-120). Three integer passes."""
    wide, shift, mask = (torch.int16, 4, 0x87F0 - (1 << 16)) if dtype == torch.bfloat16 else \
        (torch.int32, 20, 0x87F00000 - (1 << 32))
    b = q.view(torch.int8).to(wide)
    b <<= shift
    b &= mask
    return b.view(dtype)


def e4m3_to(q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e4m3fn → float32 or bfloat16, exactly (torch's own conversion runs scalar code on CPU, 3-10× slower)."""
    return _e4m3_bits(q, dtype) * 2.0 ** 120


def dequant_weight(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W = Wq · s`` (``q [out, in]`` or stacked ``[E, out, in]``) as ``dtype``: each value is the exact product
    rounded once to ``dtype`` (what ``dequant → fp32 → dtype`` gives). With power-of-two scales (ue8m0) the
    product is exact in bf16 too and is formed there, in half the bytes; other scales go through fp32."""
    *lead, out_f, in_f = q.shape
    s = scale_inv.float()
    pow2 = not (s.view(torch.int32) & 0x7FFFFF).any()
    work = dtype if dtype == torch.float32 or (dtype == torch.bfloat16 and pow2) else torch.float32
    if s.abs().amax() < 2.0 ** 7:  # fold the 2^120 into the scales: one multiply, the same rounding
        w, s = _e4m3_bits(q, work), s * 2.0 ** 120
    else:
        w = e4m3_to(q, work)
    s = s.to(work).repeat_interleave(block, -1)[..., :in_f]  # [..., ceil(out/128), in]
    if out_f % block == 0:  # whole row blocks: broadcast the scale rows instead of materialising [out, in]
        w = (w.view(*lead, out_f // block, block, in_f) * s.unsqueeze(-2)).view(*lead, out_f, in_f)
    else:
        w = w * s.repeat_interleave(block, -2)[..., :out_f, :]
    return w.to(dtype)


DEQUANT_CHUNK = 1 << 24  # weight values dequantised at once by dequant_linear (64 MiB of fp32)


def dequant_linear(x: torch.Tensor, w_q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``x · dequant(w_q)ᵀ`` in ``x.dtype`` with the weight dequantised block-row by block-row (the torch path of
    an FP8-resident linear): only ``DEQUANT_CHUNK`` values exist in fp32 at a time, and each is the value the
    dequantise-at-load path holds (``dequant_weight(..., dtype=x.dtype)``), so a weight that fits one chunk gives
    bit-identical outputs. The activations are not rounded (unlike ``fp8_gemm``)."""
    out_f, in_f = w_q.shape
    rows = max(block, DEQUANT_CHUNK // max(in_f, 1) // block * block)
    if rows >= out_f:
        return F.linear(x, dequant_weight(w_q, scale_inv, block, x.dtype))
    parts = [F.linear(x, dequant_weight(w_q[r: r + rows], scale_inv[r // block: (r + rows) // block], block, x.dtype))
             for r in range(0, out_f, rows)]
    return torch.cat(parts, dim=-1)
