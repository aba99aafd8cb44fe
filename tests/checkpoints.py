"""Tiny checkpoints made once per test session (in a temp dir, never fetched)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="dsv32-ckpt-"))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(dtype: str = "fp32", seed: int = 0, preset: str = "tiny", **overrides) -> str:
    from dsv32_engine.checkpoint_maker import PRESETS, make_checkpoint

    name = f"{preset}-{dtype}-{seed}" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    config = dict(PRESETS[preset], **overrides) if overrides else None
    return str(make_checkpoint(_ROOT / name, preset=None if config else preset, config=config, dtype=dtype, seed=seed))
