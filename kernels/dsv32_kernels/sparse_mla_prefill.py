"""sparse_mla_prefill: sparse MLA for many query tokens, each with its own top-k slots (prefill, chunked prefill).

The math is decode's with one query token per row: ``q [T, H, 576]``,
``indices [T, topk]`` physical slots into the same paged pool. The kernel is
therefore :func:`.sparse_mla_decode._sparse_mla_kernel` launched over ``T``
rows without a top-k split (``T x head blocks`` programs already fill a GPU);
keeping one kernel keeps one set of dequantisation and softmax code to test.
Unlike FlashMLA's prefill kernel this reads the fp8 records directly instead
of a dequantised bf16 workspace.
"""

from __future__ import annotations

import torch
from .layout import CacheLayout

from .dispatch import use_triton
from .sparse_mla_decode import check_sparse_mla_args, launch_sparse_mla, naive_sparse_mla_decode


def sparse_mla_prefill(q: torch.Tensor, latent_pool: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                       layout: CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [T, H, 576]``, ``indices [T, topk]`` physical slots (-1 = skip) → ``o [T, H, 512]``, ``lse [T, H]`` fp32."""
    device = check_sparse_mla_args(q, latent_pool, indices, layout)
    if not use_triton(device):
        return naive_sparse_mla_prefill(q, latent_pool, indices, sm_scale, layout)
    return launch_sparse_mla(q, latent_pool, indices, sm_scale, layout, num_splits=1)


def naive_sparse_mla_prefill(q: torch.Tensor, latent_pool: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                             layout: CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of :func:`sparse_mla_prefill` (decode's twin over token rows, chunked)."""
    return naive_sparse_mla_decode(q, latent_pool, indices, sm_scale, layout)
