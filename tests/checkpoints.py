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


def as_deepseek_v3(src: str, dst: Path) -> str:
    """A copy of checkpoint ``src`` turned into a ``deepseek_v3`` one (no indexer: dense MLA)."""
    import json

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k in ("index_n_heads", "index_head_dim", "index_topk"):
        cfg.pop(k)
    cfg["model_type"] = "deepseek_v3"
    (dst / "config.json").write_text(json.dumps(cfg))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if ".indexer." not in k}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(dst)
