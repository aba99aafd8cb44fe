"""dsv32_kernels: the DeepSeek Sparse Attention hot path, each op as a Triton kernel and a torch twin.

Every op is ``_op_kernel`` (Triton) + ``op()`` (checks, allocates, dispatches)
+ ``naive_op()`` (vectorised torch: the reference and the CPU path). ``op()``
runs Triton on CUDA tensors and the twin elsewhere; :mod:`.dispatch` forces one
or the other (``DSV32_KERNELS=auto|triton|torch``, :func:`set_backend`,
:func:`backend`). Forcing Triton on CPU runs Triton's interpreter, which needs
``TRITON_INTERPRET=1`` before ``triton`` is first imported; importing any kernel
sets it on a machine without CUDA (see :mod:`._triton`). The byte layouts of the
cache (:mod:`.layout`) and the FP8 helpers (:mod:`.fp8`) live here too, below the
engine, so that imports run engine → kernels only.
"""

from __future__ import annotations

import importlib

# name -> submodule; resolved on first access so that the engine can import the byte
# layouts (:mod:`.layout`) and FP8 helpers (:mod:`.fp8`) without importing Triton.
_LAZY = {
    "HAVE_TRITON": "_triton", "interpreter_active": "_triton",
    "BACKENDS": "dispatch", "backend": "dispatch", "get_backend": "dispatch", "set_backend": "dispatch",
    "use_triton": "dispatch",
    "store_kv": "store_kv", "naive_store_kv": "store_kv",
    "indexer_logits_decode": "indexer_logits", "naive_indexer_logits_decode": "indexer_logits",
    "indexer_logits_prefill": "indexer_logits", "naive_indexer_logits_prefill": "indexer_logits",
    "topk_indices": "topk", "naive_topk_indices": "topk",
    "sparse_mla_decode": "sparse_mla_decode", "naive_sparse_mla_decode": "sparse_mla_decode",
    "sparse_mla_prefill": "sparse_mla_prefill", "naive_sparse_mla_prefill": "sparse_mla_prefill",
    "fp8_gemm": "fp8_gemm", "naive_fp8_gemm": "fp8_gemm",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
