"""Progress bars (tqdm, on stderr) for the slow one-off work: loading a checkpoint, writing one,
the benchmarks. Shown on a terminal; ``DSV32_PROGRESS=1`` shows them anywhere (log files),
``DSV32_PROGRESS=0`` never."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None) -> Iterable[T]:
    from tqdm import tqdm

    setting = os.environ.get("DSV32_PROGRESS", "").strip().lower()
    disable = None if setting == "" else setting in ("0", "false", "no")  # None: only on a terminal
    return tqdm(items, desc=desc, unit=unit, total=total, disable=disable, leave=False, dynamic_ncols=True)
