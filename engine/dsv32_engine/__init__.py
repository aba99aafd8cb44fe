"""dsv32_engine: the model, cache, sampler, scheduler, weights and ``LLM``, shared by every worker kind.

A library: it imports only the kernels (:mod:`dsv32_kernels`, with the cache
byte layouts and FP8 helpers) and the torch-free text layer (:mod:`dsv32_text`),
never anything above it. The KV transfer is the subpackage :mod:`.transfer`.
The package initialises lazily (heavy names are resolved on first access), so
that importing a torch-free module such as :mod:`.config` does not pull torch in.
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
