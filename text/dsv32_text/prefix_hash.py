"""Content addresses of full cache pages: a hash chain over their token ids.

A page's key covers every token before it (the chain), the page's own tokens,
and a *salt* naming what produced the cache (model, numerics, dtype, page
size), so two caches that would hold different bytes never share a key.
Torch-free and stable across processes and machines (BLAKE2b, not Python's
``hash``): engines key their prefix caches with it, workers publish the keys
they hold, and the router computes the same keys for a prompt to ask who
holds how much of it (as vLLM's block hashes and SGLang's radix keys do).
"""

from __future__ import annotations

import hashlib
from array import array

DIGEST_BYTES = 16


def salt_key(*parts: object) -> str:
    """The chain's root from what must match for two caches to be interchangeable."""
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=DIGEST_BYTES).hexdigest()


def page_hashes(token_ids: list[int], page_size: int, salt: str, start: list[str] | None = None) -> list[str]:
    """Keys of the full pages of ``token_ids`` (a last partial page has none). ``start``: keys already
    computed for a prefix of the same tokens (extended, not recomputed)."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    keys = list(start or [])
    parent = keys[-1] if keys else salt
    for i in range(len(keys), len(token_ids) // page_size):
        h = hashlib.blake2b(bytes.fromhex(parent), digest_size=DIGEST_BYTES)
        h.update(array("q", token_ids[i * page_size:(i + 1) * page_size]).tobytes())
        parent = h.hexdigest()
        keys.append(parent)
    return keys
