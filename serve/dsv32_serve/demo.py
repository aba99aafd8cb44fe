"""``dsv32-serve demo`` (the README's main job): a disaggregated cluster on this machine.

Makes the tiny checkpoint if missing, starts ``up`` with 1 prefill + 1 decode
worker (and its own redis-server), sends a handful of concurrent requests
through the public gRPC API, streams their text as it arrives, prints each
request's TTFT and TPOT, and shuts everything down.
"""

from __future__ import annotations

import argparse
import threading
import time

PROMPTS = [
    ("text", "The three ideas behind DeepSeek-V3.2 are"),
    ("chat", "Explain sparse attention in one sentence."),
    ("text", "Disaggregated serving splits prefill and decode because"),
    ("chat", "写一首关于大海的短诗。"),
    ("text", "In 1969, " * 40),  # long enough to cross a page and exceed the tiny model's index_topk
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: checkpoints/tiny, made if missing)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    from . import up
    from dsv32_router.client import stream_responses

    lock = threading.Lock()
    results: dict[int, dict] = {}

    def one(i: int, kind: str, text: str, target: str) -> None:
        start = time.perf_counter()
        stamps, pieces, usage, err = [], [], None, None
        kw = dict(messages=[{"role": "user", "content": text}]) if kind == "chat" else {}
        try:
            for msg in stream_responses(target, None if kind == "chat" else text, temperature=0.0,
                                       max_tokens=args.max_tokens, timeout=120, **kw):
                if msg.token_ids:
                    stamps += [time.perf_counter() - start] * len(msg.token_ids)
                pieces.append(msg.text)
                with lock:
                    print(f"[req {i}] +{msg.text!r}", flush=True)
                if msg.finish_reason:
                    usage = (msg.finish_reason, msg.prefill_worker or "", msg.decode_worker or "")
        except Exception as e:  # noqa: BLE001 — reported below, the demo goes on
            err = str(e)
        results[i] = dict(text="".join(pieces), stamps=stamps, usage=usage, err=err, kind=kind, prompt=text)

    with up.local_cluster(args.model, prefill=args.prefill, decode=args.decode) as target:
        print(f"ready {target}", flush=True)
        threads = [threading.Thread(target=one, args=(i, k, t, target)) for i, (k, t) in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print("\n| req | input | TTFT ms | TPOT ms | tokens | finish |\n|---|---|---|---|---|---|")
    failed = 0
    for i in sorted(results):
        r = results[i]
        if r["err"]:
            failed += 1
            print(f"| {i} | {r['kind']} | - | - | - | error: {r['err']} |")
            continue
        s = r["stamps"]  # one arrival time per token
        tpot = (s[-1] - s[0]) / (len(s) - 1) * 1e3 if len(s) > 1 else float("nan")  # (E2E - TTFT) / (n - 1)
        print(f"| {i} | {r['kind']} | {s[0] * 1e3:.0f} | {tpot:.1f} | {len(s)} | {r['usage'][0] if r['usage'] else '?'} |")
    return 1 if failed else 0
