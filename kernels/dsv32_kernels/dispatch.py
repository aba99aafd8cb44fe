"""Which implementation an op runs: the Triton kernel or its torch twin.

One switch for the whole package:

* ``auto`` (default) — Triton when the op's tensors are on CUDA, torch otherwise;
* ``triton`` — always Triton. On CPU tensors this runs Triton's interpreter,
  which needs ``TRITON_INTERPRET=1`` in the environment *before Triton is first
  imported* (``import dsv32_kernels`` sets it on a machine without CUDA; set it
  yourself if something imports ``triton`` earlier - ``transformers`` does).
  Slow: tests only;
* ``torch`` — always the torch twin.

Set it with the environment variable ``DSV32_KERNELS=auto|triton|torch`` (read
at import), :func:`set_backend`, or the :func:`backend` context manager.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from ._triton import HAVE_TRITON, interpreter_active

BACKENDS = ("auto", "triton", "torch")


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    return name


_current = [_checked(os.environ.get("DSV32_KERNELS", "auto") or "auto")]


def set_backend(name: str) -> None:
    """Select ``auto``, ``triton`` or ``torch`` for every op from now on."""
    _current[0] = _checked(name)


def get_backend() -> str:
    return _current[0]


@contextmanager
def backend(name: str) -> Iterator[None]:
    """``with backend("triton"): ...`` — the previous choice is restored on exit."""
    previous = _current[0]
    set_backend(name)
    try:
        yield
    finally:
        _current[0] = previous


def use_triton(device: torch.device) -> bool:
    """Decide for one call whose tensors live on ``device``."""
    choice = _current[0]
    if choice == "torch":
        return False
    if choice == "auto":
        return HAVE_TRITON and device.type == "cuda"
    if not HAVE_TRITON:
        raise RuntimeError("DSV32_KERNELS=triton but triton is not installed")
    if device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            "the Triton backend on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (import dsv32_kernels first, or export it)")
    return True
