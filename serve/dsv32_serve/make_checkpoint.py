"""``dsv32-serve make-checkpoint``: a random-weights checkpoint in the exact HF layout
(the library function is :func:`dsv32_engine.checkpoint_maker.make_checkpoint`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsv32_engine.checkpoint_maker import PRESETS, make_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size")
    src.add_argument("--config", help="a config.json to use instead of a preset")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=["bf16", "fp8", "fp32"], default="bf16", help="weight dtype on disk")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (same seed, same checkpoint)")
    p.add_argument("--shard-mb", type=int, default=64, help="maximum shard size, MiB")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer")


def run(args: argparse.Namespace) -> int:
    config = json.loads(Path(args.config).read_text()) if args.config else None
    out = make_checkpoint(args.out, preset=None if config else args.preset, config=config, dtype=args.dtype,
                          seed=args.seed, shard_mb=args.shard_mb, with_mtp=not args.no_mtp)
    print(f"wrote {out}")
    return 0
