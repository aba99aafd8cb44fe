"""Seeded prompt tokens: ids of ordinary tokens, or tokenized random words.

Prompts are sent as token ids so that input lengths are exact. The default
source draws ids uniformly from a range of ordinary vocabulary entries of the
DeepSeek-V3 family (below 1000 sit bytes and specials; above 100 000 the rarer
merges; 128 000+ are control tokens), clipped to the served model's vocabulary.
The ``text`` source instead tokenizes seeded random English words with
``dsv32_text.tokenizer`` (torch-free) — closer to real text, but optional:
nothing else depends on it.

A prefix block keyed by a hash id is a pure function of (seed, hash id), so two
requests that share hash ids (a Mooncake trace) share those tokens exactly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

ORDINARY_IDS = (1000, 100_000)
SOURCES = ("ids", "text")

_WORDS = """the of and to in is was for that with as on by at from his her it an were are which
this be or has had not but have one their they new after first who its also been two more
time other into years when all would there can only city may year most some over between
world state many later where during such these then both under about made known world school
music family water river house power light small large early long great high part home
through people because found work game series season team place number group since three
while before well city area public government history local days night following around
several called national however second including life began use same back film until name
children each against left old way any end based within without along order book company""".split()


class TokenSource:
    """Deterministic prompt tokens for one run."""

    def __init__(self, seed: int = 0, vocab_size: int | None = None, source: str = "ids"):
        if source not in SOURCES:
            raise ValueError(f"prompt source must be one of {', '.join(SOURCES)}, got {source!r}")
        self.seed = seed
        self.source = source
        lo, hi = ORDINARY_IDS
        if vocab_size is not None:
            hi = min(hi, vocab_size)
            if hi - lo < 256:  # a toy vocabulary: skip only BOS 0 and EOS 1
                lo = min(2, max(vocab_size - 1, 0))
        if hi <= lo:
            raise ValueError(f"vocabulary of {vocab_size} tokens is too small to draw prompts from")
        self.id_range = (lo, hi)
        self.vocab_limit = vocab_size if vocab_size is not None else 1 << 31
        self._encode: Callable[[str], list[int]] | None = None
        if source == "text":
            self._encode = _load_encoder()

    def random(self, n: int, rng: np.random.Generator) -> list[int]:
        """``n`` fresh tokens drawn with ``rng``."""
        if n <= 0:
            return []
        if self._encode is None:
            return rng.integers(*self.id_range, size=n).tolist()
        ids: list[int] = []
        while len(ids) < n:
            words = rng.choice(_WORDS, size=max(16, n - len(ids)))
            fresh = [i for i in self._encode(" " + " ".join(words)) if i < self.vocab_limit]
            if len(fresh) < 4:  # a toy vocabulary holds almost none of the words' tokens
                raise ValueError(f"--prompt-source text: a {self.vocab_limit}-token vocabulary is too "
                                 "small for tokenized words; use --prompt-source ids")
            ids += fresh
        return ids[:n]

    def block(self, hash_id: int, n: int) -> list[int]:
        """The ``n`` tokens of the prefix block ``hash_id`` (same id → same tokens)."""
        return self.random(n, np.random.default_rng([self.seed, 0x5EED, int(hash_id)]))


def _load_encoder() -> Callable[[str], list[int]]:
    try:
        from dsv32_text.tokenizer import load_tokenizer
    except ImportError as e:
        raise ValueError(f"--prompt-source text needs dsv32_text.tokenizer: {e}") from None
    return load_tokenizer(None).encode
