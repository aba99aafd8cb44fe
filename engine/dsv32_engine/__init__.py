"""dsv32_engine: the model, cache, sampler and scheduler shared by both worker kinds.

The package initialises lazily: ``import dsv32_engine.tokenizer`` (and the
encoding and detokenizer modules) must not pull torch in, because the router
uses them and never imports torch. Heavy names are resolved on first access.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "LLM": "dsv32_engine.llm",
    "SamplingParams": "dsv32_engine.sampling_params",
    "RequestOutput": "dsv32_engine.outputs",
    "CompletionOutput": "dsv32_engine.outputs",
    "ModelConfig": "dsv32_engine.config",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsv32_engine' has no attribute {name!r}")
