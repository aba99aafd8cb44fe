"""Structured output: a JSON schema enforced while sampling, as a logits mask (llguidance).

One :class:`Grammar` per constrained request holds an ``llguidance.LLMatcher``
(an Earley parser over the schema's grammar, driven token by token). Before
each sampling step it gives the set of tokens that keep the output a valid
prefix of a schema-valid JSON text; the other logits of the request's row
become ``-inf`` (unconstrained rows of the same batch are untouched). After
the step the chosen token is consumed. Once the JSON is complete only EOS is
allowed, so the request ends with ``stop``.

A retried or migrated request continues from prompt + generated tokens; its
``grammar_replay`` says how many of the prompt's last tokens were generated,
and the new matcher consumes them first: the grammar state is rebuilt from
the generated tokens, never restarted mid-answer. A decode worker does the
same with the first token that the prefill worker sampled.

llguidance was picked over xgrammar because it needs neither torch nor a
compiler at run time (a Rust wheel; masks take ~1 ms on one CPU core), so the
router can validate schemas with it too without importing torch.
"""

from __future__ import annotations

import numpy as np
import torch


class GrammarError(ValueError):
    """A schema that cannot be compiled, or tokens it refuses (a replay that does not fit)."""


class GrammarTokenizer:
    """The tokenizer in llguidance's form, built once per engine (~1 s)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int):
        import llguidance

        self.llg = llguidance
        self.vocab_size = vocab_size
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_id)

    def grammar(self, json_schema: str, replay: list[int]) -> Grammar:
        return Grammar(self, json_schema, replay)


def schema_grammar(json_schema: str) -> str:
    """The llguidance grammar of a JSON schema (compact separators, no free whitespace)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(
        json_schema, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})


class Grammar:
    def __init__(self, owner: GrammarTokenizer, json_schema: str, replay: list[int]):
        self.owner = owner
        self.matcher = owner.llg.LLMatcher(owner.tok, schema_grammar(json_schema), log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"json_schema: {self.matcher.get_error()}")
        for t in replay:
            self.consume(t)

    def allowed(self) -> torch.Tensor:
        """Bool ``[vocab]``: the tokens that may come next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:self.owner.vocab_size].astype(bool)
        if mask.shape[0] < self.owner.vocab_size:
            mask = np.pad(mask, (0, self.owner.vocab_size - mask.shape[0]))
        return torch.from_numpy(mask)

    def mask_(self, row: torch.Tensor) -> None:
        """Disallowed logits of one row → -inf, in place."""
        allowed = self.allowed().to(row.device)
        row[:allowed.shape[0]].masked_fill_(~allowed, float("-inf"))

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} does not fit the grammar: {self.matcher.get_error()}")
