"""Byte layouts of the paged KV cache: the one place that does this arithmetic.

Two numerics modes share one page geometry (64 tokens a page, spec §6.4):

* ``exact`` — float pages: the latent page holds ``64 x (kv_lora_rank + rope)``
  values (576 for DeepSeek-V3.2) and the indexer page ``64 x index_head_dim``
  values, in the engine's compute dtype. No quantisation anywhere.
* ``fp8`` — the serving formats: the latent page is ``64`` FlashMLA records of
  ``kv_lora_rank`` e4m3 bytes, one fp32 scale per 128-value tile and the RoPE
  part as bf16 (656 bytes for DeepSeek-V3.2, spec §6.2); the indexer page is
  the DeepGEMM page: ``64 x index_head_dim`` e4m3 keys followed by 64 fp32
  scales (8448 bytes, spec §6.3). Both pools are ``uint8``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAGE_SIZE = 64
FP8_TILE = 128  # values per quantisation block (latent tiles, indexer keys)
NUMERICS_MODES = ("exact", "fp8")


@dataclass(frozen=True)
class CacheLayout:
    """Geometry of one layer's latent and indexer page pools."""

    kv_lora_rank: int
    """Width of the compressed latent ``c`` (512 in DeepSeek-V3.2)."""
    qk_rope_head_dim: int
    """Width of the shared RoPE key ``k_pe`` (64)."""
    index_head_dim: int
    """Width of one indexer key (128)."""
    mode: str = "exact"
    """``exact`` or ``fp8`` (see the module docstring)."""
    dtype: torch.dtype = torch.float32
    """Element type of the float pages in ``exact`` mode."""
    page_size: int = PAGE_SIZE
    """Tokens per page; 64 is what FlashMLA and DeepGEMM require on CUDA."""

    def __post_init__(self) -> None:
        if self.mode not in NUMERICS_MODES:
            raise ValueError(f"numerics mode must be one of {NUMERICS_MODES}, got {self.mode!r}")
        if self.page_size <= 0:
            raise ValueError(f"page_size must be positive, got {self.page_size}")
        if self.mode == "fp8":
            for name in ("kv_lora_rank", "index_head_dim"):
                if getattr(self, name) % FP8_TILE:
                    raise ValueError(f"fp8 mode needs {name} to be a multiple of {FP8_TILE}, got {getattr(self, name)}")

    # -- per token -----------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        """Values cached per token for attention: ``[c ‖ k_pe]``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def latent_tiles(self) -> int:
        return self.kv_lora_rank // FP8_TILE

    @property
    def latent_scale_offset(self) -> int:
        """Byte offset of the fp32 tile scales inside an FP8 record."""
        return self.kv_lora_rank

    @property
    def latent_rope_offset(self) -> int:
        """Byte offset of the bf16 ``k_pe`` inside an FP8 record."""
        return self.kv_lora_rank + 4 * self.latent_tiles

    @property
    def latent_token_bytes(self) -> int:
        if self.mode == "fp8":
            return self.latent_rope_offset + 2 * self.qk_rope_head_dim  # 656 for V3.2
        return self.latent_dim * self.dtype.itemsize

    @property
    def index_token_bytes(self) -> int:
        if self.mode == "fp8":
            return self.index_head_dim + 4  # 132 for V3.2
        return self.index_head_dim * self.dtype.itemsize

    @property
    def token_bytes(self) -> int:
        """Cache bytes per token per layer (latent + indexer key)."""
        return self.latent_token_bytes + self.index_token_bytes

    # -- per page --------------------------------------------------------------
    @property
    def index_scale_offset(self) -> int:
        """Byte offset of the 64 fp32 scales inside an FP8 indexer page (8192)."""
        return self.page_size * self.index_head_dim

    @property
    def latent_page_bytes(self) -> int:
        return self.page_size * self.latent_token_bytes

    @property
    def index_page_bytes(self) -> int:
        return self.page_size * self.index_token_bytes  # 8448 in fp8 mode

    def latent_pool_shape(self, num_pages: int) -> tuple[int, ...]:
        if self.mode == "fp8":
            return (num_pages, self.page_size, self.latent_token_bytes)
        return (num_pages, self.page_size, self.latent_dim)

    def index_pool_shape(self, num_pages: int) -> tuple[int, ...]:
        if self.mode == "fp8":
            return (num_pages, self.index_page_bytes)
        return (num_pages, self.page_size, self.index_head_dim)

    @property
    def pool_dtype(self) -> torch.dtype:
        return torch.uint8 if self.mode == "fp8" else self.dtype

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @staticmethod
    def expanded_kv_token_bytes(num_heads: int, qk_head_dim: int, v_head_dim: int, itemsize: int = 2) -> int:
        """What a cache of expanded per-head K and V costs (what ``transformers`` keeps)."""
        return num_heads * (qk_head_dim + v_head_dim) * itemsize
