"""Triton import shim and the numeric helpers shared by every kernel.

Importing this module on a machine without CUDA turns on Triton's interpreter
(``TRITON_INTERPRET=1``) unless the variable is already set or Triton was
already imported: compiled Triton cannot run there, and the interpreter has to
be chosen *before* Triton's own standard library is decorated at import time.
With Triton absent the kernels are defined against stubs and never launched.

Interpreter traps handled here (measured with triton 3.9 on CPU): fp32 → bf16
casts truncate and fp32 → e4m3 casts mishandle mantissa carries, so values are
first rounded to the target grid in fp32 (round-to-nearest-even on the bits);
the final cast is then exact on the interpreter and on the GPU alike.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules and _no_cuda():
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the torch twins still work; Triton launches raise
    HAVE_TRITON = False
    triton = SimpleNamespace(jit=lambda fn=None, **_: fn, cdiv=lambda a, b: -(-a // b),
                             next_power_of_2=lambda n: 1 << max(0, (n - 1).bit_length()))
    tl = SimpleNamespace(constexpr=object)


def interpreter_active() -> bool:
    """True when our kernels *and* Triton's own ``tl.max``/``tl.sum``... run in the interpreter.

    Both are decided when they are decorated: if ``triton`` was imported before
    ``TRITON_INTERPRET=1`` was set (``transformers`` imports it, for one), its
    standard library is compiled-only and interpreted kernels cannot call it.
    """
    if not HAVE_TRITON:
        return False
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(round_to_bf16, InterpretedFunction) and isinstance(std.max, InterpretedFunction)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def round_to_bf16(x):
    """fp32 → fp32 holding the nearest bf16 (ties to even)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3(x):
    """fp32 with ``|x| <= 448`` → fp32 holding the nearest e4m3 value (ties to even).

    Normal e4m3 (|x| >= 2^-6) keeps 3 mantissa bits: round the fp32 bits at bit 20.
    Subnormals sit on a fixed 2^-9 grid: adding 1.5·2^14 puts them in a binade
    whose fp32 ulp is 2^-9, so the fp32 add rounds them (the sign is put back).
    """
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    sub = (tl.abs(x) + 24576.0) - 24576.0
    sub = (sub.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


@triton.jit
def pow2_scale_bits(amax):
    """``(s, 1/s)`` with ``s = 2^ceil(log2(max(amax, 1e-4) / 448))``, exactly (fp8.pow2_scale)."""
    y = tl.math.div_rn(tl.maximum(amax, 1e-4), tl.full(amax.shape, 448.0, tl.float32))
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    e = tl.minimum(e, 253)
    return (e << 23).to(tl.float32, bitcast=True), ((254 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def quant_e4m3(x, inv_scale):
    """``clamp(x / s, ±448)`` rounded to e4m3 (as an fp32 tensor); ``inv_scale`` broadcasts."""
    return round_to_e4m3(tl.minimum(tl.maximum(x * inv_scale, -448.0), 448.0))
