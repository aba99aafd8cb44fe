"""dsv32_kernels: the DeepSeek Sparse Attention hot path, each op as a Triton kernel and a torch twin.

Every op is ``_op_kernel`` (Triton) + ``op()`` (checks, allocates, dispatches)
+ ``naive_op()`` (vectorised torch: the reference and the CPU path). ``op()``
runs Triton on CUDA tensors and the twin elsewhere; :mod:`.dispatch` forces one
or the other (``DSV32_KERNELS=auto|triton|torch``, :func:`set_backend`,
:func:`backend`). Forcing Triton on CPU runs Triton's interpreter, which needs
``TRITON_INTERPRET=1`` before ``triton`` is first imported; importing this
package sets it on a machine without CUDA (see :mod:`._triton`). The byte layouts
of the cache (:mod:`.layout`) and the FP8 helpers (:mod:`.fp8`) live here too,
below the engine, so that imports run engine → kernels only.
"""

from __future__ import annotations

from ._triton import HAVE_TRITON, interpreter_active
from .dispatch import BACKENDS, backend, get_backend, set_backend, use_triton
from .fp8_gemm import fp8_gemm, naive_fp8_gemm
from .indexer_logits import (indexer_logits_decode, indexer_logits_prefill, naive_indexer_logits_decode,
                             naive_indexer_logits_prefill)
from .sparse_mla_decode import naive_sparse_mla_decode, sparse_mla_decode
from .sparse_mla_prefill import naive_sparse_mla_prefill, sparse_mla_prefill
from .store_kv import naive_store_kv, store_kv
from .topk import naive_topk_indices, topk_indices

__all__ = [
    "BACKENDS", "HAVE_TRITON", "backend", "get_backend", "interpreter_active", "set_backend", "use_triton",
    "store_kv", "naive_store_kv",
    "indexer_logits_decode", "naive_indexer_logits_decode", "indexer_logits_prefill", "naive_indexer_logits_prefill",
    "topk_indices", "naive_topk_indices",
    "sparse_mla_decode", "naive_sparse_mla_decode", "sparse_mla_prefill", "naive_sparse_mla_prefill",
    "fp8_gemm", "naive_fp8_gemm",
]
