"""Streaming split of generated text into reasoning and content (thinking mode).

In thinking mode the prompt ends with ``<think>``, so the answer is
``reasoning </think> content``. :class:`ReasoningSplitter` takes the text in
any chunking and returns ``(reasoning, content)`` deltas; a possible start of
``</think>`` at the end of what it has seen is held back until the next chunk
or :meth:`~ReasoningSplitter.finish` decides. Every decision depends only on
text already seen and is never taken back, so the concatenated deltas are the
same for every chunking (one byte at a time, one token at a time, all at once).

An answer that never closes its reasoning (cut by ``max_tokens``) is all
reasoning, as vLLM's DeepSeek reasoning parser reports it; nothing is dropped
but the ``</think>`` marker itself.
"""

from __future__ import annotations

from .encoding import THINK_END


def held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReasoningSplitter:
    def __init__(self, thinking: bool):
        self.in_reasoning = thinking
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) deltas decided by ``text``."""
        if not self.in_reasoning:
            return "", text
        self.buf += text
        i = self.buf.find(THINK_END)
        if i >= 0:
            reasoning, content = self.buf[:i], self.buf[i + len(THINK_END):]
            self.buf, self.in_reasoning = "", False
            return reasoning, content
        keep = held_prefix(self.buf, THINK_END)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out, ""

    def finish(self) -> tuple[str, str]:
        out, self.buf = self.buf, ""
        return (out, "") if self.in_reasoning else ("", out)
