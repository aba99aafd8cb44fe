"""Incremental detokenization and stop strings, for streaming text deltas.

Byte-level BPE splits multi-byte characters (Chinese, emoji) across tokens, so
decoding one token at a time would emit U+FFFD halves. We use the
prefix-offset / read-offset technique of vLLM and HF ``TextStreamer``: keep a
small window ``ids[prefix_offset:]`` that starts at a known character
boundary, decode it, and emit only what lies beyond ``ids[prefix_offset:
read_offset]`` once the decoded tail is no longer an incomplete character.
Concatenating every delta (plus :meth:`IncrementalDetokenizer.flush`) gives
exactly ``tokenizer.decode(generated_ids)``.

Stop strings are matched on text, not tokens: a stop string may straddle two
deltas, and the caller must also hold back a tail that could still grow into
one (:func:`find_stop`, :func:`partial_stop_len`).
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

REPLACEMENT_CHAR = "\ufffd"
# How many prompt tokens to decode as left context. Byte-level BPE needs none,
# but SentencePiece-style decoders drop a leading space without it, and a
# checkpoint may bring its own tokenizer.json.
_PROMPT_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into complete-character text deltas."""

    def __init__(self, tokenizer: _Decoder, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        # Context that ends inside a character would make its decoded text not a
        # prefix of context+generated text; such (token-id) prompts get none.
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pieces: list[str] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    @property
    def token_ids(self) -> list[int]:
        """Generated ids so far (prompt context excluded)."""
        return self._ids[self._num_context:]

    @property
    def text(self) -> str:
        """All text emitted so far (held-back partial characters excluded)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append generated ids; return the newly completed text (maybe "")."""
        if isinstance(token_ids, int):
            self._ids.append(token_ids)
        else:
            self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character becomes U+FFFD),
        as ``tokenizer.decode`` of the whole sequence would render it."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""  # an incomplete character (or nothing visible yet): wait
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta


def find_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> int | None:
    """Index in ``text`` where the earliest stop string begins, or ``None``.

    ``start`` is how much of ``text`` was already checked (its length before
    the newest delta). The search begins ``max_len - 1`` characters earlier so
    that a stop string straddling the old text and the delta is found, while
    old text is not searched again. Truncate the output at the returned index.
    """
    stops = [s for s in stop_strings if s]
    if not stops:
        return None
    begin = max(0, start - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, begin) for s in stops) if i >= 0]
    return min(hits) if hits else None


def partial_stop_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string.

    A streaming caller emits ``text[:len(text) - partial_stop_len(...)]`` and
    holds the rest, so that text later cut by a stop string is never sent.
    """
    best = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
