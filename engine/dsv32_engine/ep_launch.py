"""Run one function on every rank of a local expert-parallel group (offline use: tests, benchmarks).

``run_group(fn, size, *args)`` starts ``size`` processes (``spawn``), calls
``fn(ep_config, *args)`` in each with that rank's :class:`~.parallel.EPConfig`
(rendezvous on a free loopback port), and returns the ranks' results in rank
order. A rank that raises, dies or overruns ``timeout_s`` fails the whole call
with the rank and its error; every process is gone when it returns.

Serving does not use this: a worker started with ``--ep-size N`` spawns its
own ranks (see ``dsv32_cluster.runtime``), each a full worker process.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import time
import traceback
from typing import Any, Callable

from .parallel import EPConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, cfg: EPConfig, args, results) -> None:
    try:
        results.put((cfg.rank, True, fn(cfg, *args)))
    except BaseException:  # noqa: BLE001 — reported to the parent with its traceback
        results.put((cfg.rank, False, traceback.format_exc()))


def run_group(fn: Callable[..., Any], size: int, *args, timeout_s: float = 600.0, ep_timeout_s: float = 60.0,
              placement: dict | None = None) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    master = f"127.0.0.1:{_free_port()}"
    procs = []
    for rank in range(size):
        cfg = EPConfig(size, rank, master, group_id=f"offline-{master}", timeout_s=ep_timeout_s, placement=placement)
        p = ctx.Process(target=_rank_main, args=(fn, cfg, args, results), daemon=True)
        p.start()
        procs.append(p)
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < size:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"EP rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"EP group of {size} did not finish in {timeout_s:.0f}s")
                continue
            if not ok:
                raise RuntimeError(f"EP rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(5 if not p.is_alive() else 10)
            if p.is_alive():
                p.kill()
                p.join(5)
    return [out[r] for r in range(size)]
