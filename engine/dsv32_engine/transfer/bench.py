"""``dsv32-serve bench transfer``: KV transfer vs raw torch.distributed, and layer-by-layer overlap.

Two processes on this machine: this one is the decode worker (``KVReceiver``),
a subprocess is the prefill worker (``KVSender``). DeepSeek-V3.2 page layout
(kv_lora_rank 512, rope 64, index_head_dim 128, fp8: 656 + 132 bytes a token a
layer), ``--layers`` layers (default 8; the model has 61). For each prompt length:

* transfer — ``begin``, ``send_layer`` for every layer at once, until the
  receiver has every page in place and the checksum verified; vs raw — one
  ``send``/``recv`` of the same number of bytes in one buffer over a gloo pair
  group on the same store. Ratio = raw time / transfer time (aim ≥ 0.8).
* overlap — the sender "computes" each layer (``--layer-ms``, sleep or a
  matmul loop) and calls ``send_layer`` after it, as prefill does. TTFT proxy =
  ``begin`` to the last page landing; the share of it spent after the last
  layer was handed over is what overlap leaves exposed (aim ≤ 10%).
* CPU time of both processes per transfer and per raw send: on a CPU box the
  checksum, gather and scatter passes compete with the socket copies for the
  same cores, which is what bounds the ratio here (on GPUs they are kernels).

Times are medians over ``--repeats``, measured across the two processes with
the shared monotonic clock; the ratio is the median of the ratios of each
transfer and the raw send right after it (the load of a shared machine
changes from second to second). Pages are a random permutation on both sides
(gather and scatter included) unless ``--contiguous`` (runs: sent from and
received into the pools in place). ``--message-mb`` sets the sender's largest
message (``KVSender(chunk_bytes=...)``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch

from dsv32_kernels.layout import CacheLayout

ENDPOINT_HOST = "127.0.0.1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="1024,2048,4096,8192,16384", help="prompt lengths (comma-separated)")
    p.add_argument("--layers", type=int, default=8, help="layers transferred (DeepSeek-V3.2 has 61)")
    p.add_argument("--mode", choices=["fp8", "exact"], default="fp8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layer-ms", type=float, default=None,
                   help="simulated prefill time per layer (default: 1.25 ms per 1k prompt tokens)")
    p.add_argument("--compute", choices=["sleep", "matmul"], default="sleep",
                   help="how a layer is 'computed': sleep (GPU-like: the CPU stays free) or a matmul loop")
    p.add_argument("--contiguous", action="store_true", help="use runs of consecutive pages (no gather/scatter)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--message-mb", type=float, default=None, help="KVSender's message size (default: its own)")
    p.add_argument("--json", help="also write the results here")


def _layout(mode: str) -> CacheLayout:
    return CacheLayout(512, 64, 128, mode=mode, dtype=torch.bfloat16)


class _Cache:
    """The three attributes the transfer uses."""

    def __init__(self, layout: CacheLayout, layers: int, pages: int, fill: bool):
        def pool(shape):
            t = torch.zeros(shape, dtype=layout.pool_dtype)
            if fill:
                raw = t.view(torch.uint8)
                raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
            return t

        self.layout = layout
        self.latent = [pool(layout.latent_pool_shape(pages)) for _ in range(layers)]
        self.index = [pool(layout.index_pool_shape(pages)) for _ in range(layers)]


def _plan(args) -> dict:
    tokens = [int(t) for t in str(args.tokens).split(",")]
    layout = _layout(args.mode)
    max_pages = layout.pages_for(max(tokens))
    cases = [{"kind": k, "tokens": max(tokens), "warmup": True} for k in ("xfer", "raw")]
    for t in tokens:
        for _ in range(args.repeats):
            cases += [{"kind": "xfer", "tokens": t}, {"kind": "raw", "tokens": t}]
    for t in tokens:
        ms = args.layer_ms if args.layer_ms is not None else 1.25 * t / 1024
        cases += [{"kind": "overlap", "tokens": t, "layer_ms": ms} for _ in range(args.repeats)]
    return {"mode": args.mode, "layers": args.layers, "pages": max_pages, "contiguous": args.contiguous,
            "compute": args.compute, "timeout": args.timeout, "message_mb": args.message_mb, "cases": cases}


def _pages(plan: dict, n: int, seed: int) -> list[int]:
    if plan["contiguous"]:
        return list(range(n))
    return torch.randperm(plan["pages"], generator=torch.Generator().manual_seed(seed))[:n].tolist()


def _raw_group(endpoint: str, rank: int, timeout: float):
    import torch.distributed as dist

    from .pair import connect_store, parse_endpoint

    host, port = parse_endpoint(endpoint)
    store = connect_store(host, port, timeout)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=timeout)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(dist.PrefixStore("bench/raw/", store), rank, 2, opts), store


# -- the prefill side (subprocess) ------------------------------------------------------------
def _compute(kind: str, ms: float, mats) -> None:
    if kind == "sleep":
        time.sleep(ms / 1000)
        return
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        torch.mm(*mats)


def _sender_main(endpoint: str, plan: dict) -> None:
    from . import KVSender

    torch.set_num_threads(1)
    layout = _layout(plan["mode"])
    cache = _Cache(layout, plan["layers"], plan["pages"], fill=True)
    extra = {} if plan.get("message_mb") is None else {"chunk_bytes": int(plan["message_mb"] * (1 << 20))}
    tx = KVSender(cache, "bench-prefill", timeout_s=plan["timeout"], **extra)
    pg, store = _raw_group(endpoint, 0, plan["timeout"])
    page_bytes = layout.latent_page_bytes + layout.index_page_bytes
    raw = torch.ones(layout.pages_for(max(c["tokens"] for c in plan["cases"])) * page_bytes * plan["layers"],
                     dtype=torch.uint8)
    mats = (torch.randn(256, 256), torch.randn(256, 256))
    from ..progress import progress

    for i, case in enumerate(progress(plan["cases"], "bench transfer", "case")):
        n = layout.pages_for(case["tokens"])
        store.wait([f"bench/go/{i}"])
        t0, cpu0 = time.perf_counter(), time.process_time()
        if case["kind"] == "raw":
            pg.send([raw[: n * page_bytes * plan["layers"]]], 1, i).wait(timedelta(seconds=plan["timeout"]))
            t_last = t0
        else:
            h = tx.begin(f"bench-{i}", endpoint, "bench-decode", _pages(plan, n, seed=1))
            for layer in range(plan["layers"]):
                if case["kind"] == "overlap":
                    _compute(plan["compute"], case["layer_ms"], mats)
                tx.send_layer(h, layer)
            t_last = time.perf_counter()
            tx.finish(h, plan["timeout"])
        store.set(f"bench/t/{i}", json.dumps([t0, t_last, time.process_time() - cpu0]))
    tx.close()


# -- the decode side (this process) -------------------------------------------------------------
def _measure(plan: dict) -> list[dict]:
    from . import KVReceiver
    from .pair import connect_store

    layout = _layout(plan["mode"])
    cache = _Cache(layout, plan["layers"], plan["pages"], fill=False)
    rx = KVReceiver(cache, ENDPOINT_HOST, 0, "bench-decode", timeout_s=plan["timeout"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dsv32_engine.transfer.bench", "--sender", rx.endpoint,
                             json.dumps(plan)], env=env)
    try:
        store = connect_store(ENDPOINT_HOST, rx.port, plan["timeout"])
        pg, _ = _raw_group(rx.endpoint, 1, plan["timeout"])
        page_bytes = layout.latent_page_bytes + layout.index_page_bytes
        raw = torch.zeros(plan["pages"] * page_bytes * plan["layers"], dtype=torch.uint8)
        samples = []
        for i, case in enumerate(plan["cases"]):
            n = layout.pages_for(case["tokens"])
            nbytes = n * page_bytes * plan["layers"]
            tid = f"bench-{i}"
            cpu0 = time.process_time()
            if case["kind"] == "raw":
                work = pg.recv([raw[:nbytes]], 0, i)
            else:
                rx.expect(tid, "bench-prefill", _pages(plan, n, seed=2))
            store.set(f"bench/go/{i}", "1")
            if case["kind"] == "raw":
                work.wait(timedelta(seconds=plan["timeout"]))
            else:
                result = rx.wait(tid, plan["timeout"])
                assert result.num_bytes == nbytes
                rx.release(tid)
            t_done, cpu = time.perf_counter(), time.process_time() - cpu0
            t0, t_last, sender_cpu = json.loads(store.get(f"bench/t/{i}"))
            if not case.get("warmup"):
                samples.append({**case, "bytes": nbytes, "total_s": t_done - t0, "after_last_s": t_done - t_last,
                                "cpu_s": cpu + sender_cpu})
        if proc.wait(plan["timeout"]) != 0:
            raise RuntimeError(f"the sender process exited {proc.returncode}")
        return samples
    finally:
        if proc.poll() is None:
            proc.kill()
        rx.close()


def _rows(plan: dict, samples: list[dict]) -> list[dict]:
    rows = []
    for t in dict.fromkeys(s["tokens"] for s in samples):
        def med(kind, key):
            return statistics.median(s[key] for s in samples if s["tokens"] == t and s["kind"] == kind)

        xfer, raw = med("xfer", "total_s"), med("raw", "total_s")
        # Each transfer is followed by its raw twin: the ratio of a pair is measured under the same load.
        pairs = zip((s for s in samples if s["tokens"] == t and s["kind"] == "xfer"),
                    (s for s in samples if s["tokens"] == t and s["kind"] == "raw"))
        ratio = statistics.median(r["total_s"] / x["total_s"] for x, r in pairs)
        ttft, after = med("overlap", "total_s"), med("overlap", "after_last_s")
        one = next(s for s in samples if s["tokens"] == t)
        layer_ms = next(s["layer_ms"] for s in samples if s["tokens"] == t and s["kind"] == "overlap")
        rows.append({"tokens": t, "pages": -(-t // 64), "mbytes": one["bytes"] / 1e6, "transfer_ms": xfer * 1e3,
                     "raw_ms": raw * 1e3, "ratio": ratio, "gb_per_s": one["bytes"] / xfer / 1e9,
                     "transfer_cpu_ms": med("xfer", "cpu_s") * 1e3, "raw_cpu_ms": med("raw", "cpu_s") * 1e3,
                     "layer_ms": layer_ms, "ttft_ms": ttft * 1e3, "wait_after_last_ms": after * 1e3,
                     "wait_share": after / ttft,
                     "serial_wait_share": xfer / (xfer + plan["layers"] * layer_ms / 1e3)})
    return rows


def _table(plan: dict, rows: list[dict]) -> str:
    head = ("| tokens | pages | MB | transfer ms | raw send/recv ms | ratio raw/transfer | GB/s "
            "| CPU ms transfer / raw | layer ms | TTFT ms | wait after last layer ms | wait share "
            "| (no overlap: wait share) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['pages']} | {r['mbytes']:.1f} | {r['transfer_ms']:.1f} | "
                     f"{r['raw_ms']:.1f} | {r['ratio']:.2f} | {r['gb_per_s']:.2f} | "
                     f"{r['transfer_cpu_ms']:.0f} / {r['raw_cpu_ms']:.0f} | {r['layer_ms']:.1f} | "
                     f"{r['ttft_ms']:.1f} | {r['wait_after_last_ms']:.1f} | {100 * r['wait_share']:.1f}% | "
                     f"{100 * r['serial_wait_share']:.0f}% |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    t0 = time.perf_counter()
    rows = _rows(plan, _measure(plan))
    print(f"KV transfer, {plan['mode']} DeepSeek-V3.2 pages, {plan['layers']} layers, "
          f"{'contiguous' if plan['contiguous'] else 'scattered'} pages, gloo on loopback, "
          f"median of {args.repeats}; layer compute: {plan['compute']}\n")
    print(_table(plan, rows))
    print(f"\nCPU ms: both processes, all threads. aims: ratio >= 0.8, wait share <= 10%. "
          f"({time.perf_counter() - t0:.1f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in plan.items() if k != "cases"} | {"repeats": args.repeats},
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--sender"]:
    _sender_main(sys.argv[2], json.loads(sys.argv[3]))
