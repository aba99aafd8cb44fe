"""Linear layers whose weights may stay FP8 in memory, as the checkpoint stores them (spec §8).

A :class:`Linear` holds ``weight [out, in]`` in the compute dtype, or — when the
loader keeps an FP8 checkpoint's weights as stored (``weight_format="fp8"``) —
``weight`` in e4m3 plus ``weight_scale_inv [ceil(out/128), ceil(in/128)]`` fp32,
the checkpoint's own names. Which form a layer has is decided at load, by
:mod:`.weights`; the module only asks whether it has a scale.

The FP8 product (:func:`fp8_linear`):

* on CUDA (``dsv32_kernels.use_triton``): ``fp8_gemm``, block-scaled W8A8 as the
  reference's ``linear`` — the activations are rounded to e4m3 per token per 128
  channels with power-of-two scales, the weights are used as stored;
* elsewhere: ``fp8.dequant_linear``, the weight dequantised block-row by block-row
  into the compute dtype per call; the activations are not rounded, and the
  result is the dequantise-at-load path's (bit-identical for a weight that fits
  one dequantisation chunk).

The bound between the two paths (one product, ``x`` the activations, ``s_x`` the
scale of the 128-block holding channel d, ``W`` the dequantised weight)::

    |fp8_gemm(x) - x·Wᵀ| <= Σ_d (2^-4 |x_d| + 2^-10 s_x) |W_d|  (+ summation order)

— e4m3 keeps 3 mantissa bits (a relative rounding of 2^-4), its subnormal step
is 2^-9 of the scale (2^-10 after rounding to nearest); the weights contribute
nothing since both paths use the same dequantised values.
``tests/test_kernels_fp8_gemm.py`` checks it per product,
``tests/test_weights_fp8.py`` through the whole model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv32_kernels import fp8, fp8_gemm, use_triton


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """``x [..., in]`` · dequant(``w_q [out, in]``)ᵀ → ``[..., out]`` in ``x.dtype`` (see the module doc)."""
    if use_triton(x.device):
        return fp8_gemm(x, w_q, scale_inv)
    return fp8.dequant_linear(x, w_q, scale_inv)


def expert_matmul(buf: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor | None,
                  experts: torch.Tensor) -> torch.Tensor:
    """``buf [A, M, in]`` row group ``a`` times expert ``experts[a]``'s ``w [E, out, in]`` → ``[A, M, out]``.

    As stored: one ``fp8_gemm`` per active expert on CUDA; on CPU the active experts' weights are
    dequantised (only those: the batch bounds them) and multiplied in one ``bmm``, exactly as the
    dequantise-at-load path multiplies them.
    """
    if scale_inv is None:
        return torch.bmm(buf, w[experts].transpose(1, 2))
    if use_triton(buf.device):
        return torch.stack([fp8_gemm(buf[a], w[e], scale_inv[e]) for a, e in enumerate(experts.tolist())])
    return torch.bmm(buf, fp8.dequant_weight(w[experts], scale_inv[experts], dtype=buf.dtype).transpose(1, 2))


class Linear(nn.Module):
    """``y = x · Wᵀ`` (no bias), ``W`` in the compute dtype or FP8 + ``weight_scale_inv``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_parameter("weight_scale_inv", None)  # set by the loader when the weight stays FP8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale_inv is None:
            return F.linear(x, self.weight)
        return fp8_linear(x, self.weight, self.weight_scale_inv)

    def extra_repr(self) -> str:
        kind = "fp8" if self.weight_scale_inv is not None else str(self.weight.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"
