"""Argument checks shared by the op wrappers (shapes, dtypes, strides, devices)."""

from __future__ import annotations

from typing import Sequence

import torch
from .layout import CacheLayout


def expect(t: torch.Tensor, name: str, shape: Sequence[int | None], *, dtypes: Sequence[torch.dtype] = (),
           floating: bool = False) -> None:
    """``shape`` entries of ``None`` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if dtypes and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"tensors on different devices: {devices}")
    return first


def check_latent_pool(pool: torch.Tensor, layout: CacheLayout) -> None:
    """fp8: uint8 ``[P, page, record]`` (page stride may exceed ``page*record``); exact: float ``[P, page, 576]``."""
    if layout.mode == "fp8":
        expect(pool, "latent_pool", (None, layout.page_size, layout.latent_token_bytes), dtypes=(torch.uint8,))
        if pool.stride(2) != 1 or pool.stride(1) != layout.latent_token_bytes or pool.stride(0) % 4:
            raise ValueError(f"latent_pool: records must be packed ({layout.latent_token_bytes} bytes a token, "
                             f"page stride a multiple of 4), got strides {pool.stride()}")
        if pool.data_ptr() % 4:
            raise ValueError("latent_pool: base must be 4-byte aligned (fp32 scales inside the record)")
    else:
        expect(pool, "latent_pool", (None, layout.page_size, layout.latent_dim), dtypes=(layout.dtype,))
        if pool.stride(2) != 1:
            raise ValueError(f"latent_pool: last dim must be contiguous, got strides {pool.stride()}")


def check_index_pool(pool: torch.Tensor, layout: CacheLayout) -> None:
    """fp8: uint8 ``[P, 8448]`` DeepGEMM pages; exact: float ``[P, page, index_head_dim]``."""
    if layout.mode == "fp8":
        expect(pool, "index_pool", (None, layout.index_page_bytes), dtypes=(torch.uint8,))
        if pool.stride(1) != 1 or pool.stride(0) % 4 or pool.data_ptr() % 4:
            raise ValueError(f"index_pool: pages must be contiguous and 4-byte aligned, got strides {pool.stride()}")
    else:
        expect(pool, "index_pool", (None, layout.page_size, layout.index_head_dim), dtypes=(layout.dtype,))
        if pool.stride(2) != 1:
            raise ValueError(f"index_pool: last dim must be contiguous, got strides {pool.stride()}")


def check_pools(latent_pool: torch.Tensor, index_pool: torch.Tensor, layout: CacheLayout) -> None:
    check_latent_pool(latent_pool, layout)
    check_index_pool(index_pool, layout)


def check_pow2(name: str, n: int) -> None:
    """The Triton kernels tile these dims with ``tl.arange`` (power-of-two lengths)."""
    if n & (n - 1):
        raise ValueError(f"the Triton kernels need {name} to be a power of two, got {n} (the torch path has no limit)")
