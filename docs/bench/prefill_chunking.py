"""Issue 10, finding 9 (README "Chunked prefill across requests"): a 5-token request sent 0.3 s after a
3,072-token one on `up --prefill 1 --decode 1`; prints both TTFTs, two pairs.

Usage (from the repository root): OMP_NUM_THREADS=1 .venv/bin/python docs/bench/prefill_chunking.py MODEL_DIR
[BUDGET]   (BUDGET: the prefill workers' --max-num-batched-tokens; default: theirs)
"""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from dsv32_router.client import stream_responses


def ttft(target: str, prompt: list[int]) -> float:
    t0 = time.monotonic()
    for m in stream_responses(target, prompt, max_tokens=4, temperature=0.0, ignore_eos=True, timeout=300):
        if m.token_ids:
            return time.monotonic() - t0
    raise RuntimeError("no token")


def main(model: str, budget: str = "default") -> None:
    flags = [] if budget == "default" else [f"--prefill-arg=--max-num-batched-tokens={budget}"]
    up = subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", "up", "--model", model, "--port", "0",
                           "--prefill", "1", "--decode", "1", *flags], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = up.stdout.readline()
        assert line.startswith("ready "), line
        target = line.split()[1]
        ttft(target, [5, 6, 7])  # warm-up
        for rep in range(2):  # a new long prompt each time: nothing cached
            long = [(97 * i + 31 * rep) % 60_000 + 100 for i in range(3072)]
            with ThreadPoolExecutor(2) as pool:
                a = pool.submit(ttft, target, long)
                time.sleep(0.3)
                b = pool.submit(ttft, target, [11, 12, 13, 14, 15 + rep])
                print(f"budget {budget}: long TTFT {a.result():.2f} s, short TTFT {b.result():.2f} s", flush=True)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)


if __name__ == "__main__":
    main(*sys.argv[1:])
