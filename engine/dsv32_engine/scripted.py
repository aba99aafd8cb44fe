"""A test-only logits processor: the model emits a fixed answer (``DSV32_SCRIPTED_OUTPUT=FILE``).

With the variable set to a UTF-8 text file, every request's output is the tokenization of
that text followed by EOS, whatever the weights say: at each step the logits keep only the
script's next token (the ``n``-th generated token is the script's ``n``-th, so a prefill
worker's first token and a decode worker's later ones agree). End-to-end tests use it to make
a real cluster (real workers, the real engine) produce DSML tool calls without a fine-tuned
checkpoint. It replaces the model's choice: never set it in production. Off when unset.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ENV = "DSV32_SCRIPTED_OUTPUT"


class ScriptedOutput:
    def __init__(self, token_ids: list[int], eos_token_id: int):
        self.token_ids, self.eos = list(token_ids), eos_token_id

    @classmethod
    def from_env(cls, tokenizer, eos_token_id: int) -> "ScriptedOutput | None":
        path = os.environ.get(ENV, "")
        if not path:
            return None
        return cls(tokenizer.encode(Path(path).read_text(encoding="utf-8")), eos_token_id)

    def mask_(self, logits: torch.Tensor, num_generated: int) -> None:
        """Keep only the script's token for the request's next position in one row of logits."""
        n = num_generated
        tok = self.token_ids[n] if n < len(self.token_ids) else self.eos
        logits.fill_(float("-inf"))
        logits[tok] = 0.0
