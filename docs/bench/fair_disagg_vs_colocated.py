"""Issue 13, item 5: a fair disaggregated-vs-colocated comparison on the tiny checkpoint.

    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/fair_disagg_vs_colocated.py run     [--out DIR] [knobs]
    .venv/bin/python docs/bench/fair_disagg_vs_colocated.py analyze [--out DIR]

Method (see docs/bench/fair_disagg_vs_colocated.md):
* equal hardware: 2 worker processes each side, `up --prefill 1 --decode 1` vs `up --colocated --workers 2`,
  both `--dtype auto` (bf16 on this CPU: AVX512-BF16);
* the colocated baseline at its best chunked-prefill budget: `--max-num-batched-tokens` swept over
  --budgets at --budget-rate (Poisson), each point --reps times; the best (highest median goodput
  averaged over the SLO pairs) is used for the comparison;
* the prefill:decode split from the two roles' request rates: each role's CPU seconds per request,
  measured during the first disaggregated block (a role's capacity = 1 / its CPU s per request on one core);
* goodput at several (TTFT, TPOT) SLO pairs, computed here from each run's requests.csv (a failed,
  aborted or unsent request is a miss); TTFT is the client's (send -> first token), so it includes
  routing, the prefill, and the KV transfer of the disaggregated path;
* arrivals: Poisson, gamma (burstiness 0.25: bursty), and a fixed-schedule replay of a synthetic
  Mooncake-shaped trace (written by this script) scaled to the same mean rates;
* every point --reps times (different --seed per repeat, the same seed for both modes), blocks
  alternating D,C / C,D / D,C so a slow drift of the machine's load hits both; `uptime` before each run
  and the CPU seconds of every process (and of the whole machine) per block are recorded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_times  # noqa: E402  (docs/bench/cpu_times.py)

CLI = str(ROOT / ".venv/bin/dsv32-serve")
# (name, ttft ms, tpot ms): chosen before the runs from the idle-machine costs (a 1024-token prefill
# ~1 s, a decode step 20-60 ms); the balanced pair is the earlier benchmark's SLO.
SLOS = [("tight-TTFT", 1500, 300), ("balanced", 5000, 200), ("tight-TPOT", 10000, 100)]
ARRIVALS = ["poisson", "gamma", "trace"]
SLO_HDR = [f"{n} (TTFT ≤ {t / 1000:g} s, TPOT ≤ {p} ms)" for n, t, p in SLOS]
MODES = {"disagg": ["--prefill", "1", "--decode", "1"], "colocated": ["--colocated", "--workers", "2"]}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def log(out: Path, rec: dict) -> None:
    rec = {"utc": time.strftime("%H:%M:%S", time.gmtime()), **rec}
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


# ---------------------------------------------------------------------------------------------- cluster
class Cluster:
    def __init__(self, out: Path, name: str, flags: list[str]):
        self.logs = Path(os.environ.get("FAIR_WORK", "/tmp/dsv32-fair")) / f"{name}-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.stdout = open(self.logs / "up.out", "w")
        cmd = [CLI, "up", "--model", str(ROOT / "checkpoints/tiny"), "--port", "0", "--dtype", "auto",
               *flags, "--log-dir", str(self.logs)]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=self.stdout, stderr=open(self.logs / "up.err", "w"),
                                     cwd=ROOT, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        t0 = time.monotonic()
        while True:
            text = (self.logs / "up.out").read_text()
            ready = [ln for ln in text.splitlines() if ln.startswith("ready ")]
            if ready:
                self.target = ready[0].split()[1]
                break
            if self.proc.poll() is not None or time.monotonic() - t0 > 300:
                self.stop()
                raise RuntimeError(f"up failed: {(self.logs / 'up.err').read_text()[-2000:]}")
            time.sleep(0.5)
        self.start_s = time.monotonic() - t0
        self.cpu0 = cpu_times.snapshot(self.proc.pid)

    def cpu_used(self) -> dict[str, float]:
        now = cpu_times.snapshot(self.proc.pid)
        return {k: round(v - self.cpu0.get(k, 0.0), 1) for k, v in now.items()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.stdout.close()


# ---------------------------------------------------------------------------------------------- workload
def write_trace(path: Path, n: int, rate: float, seed: int = 7) -> None:
    """A small Mooncake-shaped trace: on/off bursts (bursts of 2-5 requests 0.1-0.4 s apart, then a
    pause), mean rate `rate`; 25 % long prompts (700-1100 tokens, 4-12 out), the rest chats (40-120 in,
    8-24 out). Fixed (seed 7): every repeat replays the same schedule and lengths."""
    rng = random.Random(seed)
    t, rows = 0.0, []
    while len(rows) < n:
        for _ in range(rng.randint(2, 5)):
            if len(rows) == n:
                break
            long = rng.random() < 0.25
            rows.append({"timestamp": round(t * 1000), "input_length": rng.randint(700, 1100) if long else rng.randint(40, 120),
                         "output_length": rng.randint(4, 12) if long else rng.randint(8, 24), "hash_ids": []})
            t += rng.uniform(0.1, 0.4)
        t += rng.expovariate(1.0)
    scale = (rows[-1]["timestamp"] / 1000.0) / ((n - 1) / rate)  # stretch to the mean rate
    for r in rows:
        r["timestamp"] = round(r["timestamp"] / scale)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def loadtest(out: Path, a: argparse.Namespace, c: Cluster, mode: str, arrival: str, rate: float, rep: int,
             tag: str) -> None:
    d = out / "runs" / run_name(tag, mode, c.budget, arrival, rate, rep)
    if (d / "requests.csv").exists():
        return
    seed = 100 + rep
    cmd = [CLI, "loadtest", "--target", c.target, "--seed", str(seed), "--request-timeout", "120",
           "--no-plots", "--no-progress", "--output-dir", str(d), "--slo", "ttft=5000,tpot=200"]
    if arrival == "trace":
        cmd += ["--workload", "trace", "--trace", str(out / "trace.jsonl"), "--fixed-schedule",
                "--trace-time-scale", f"{rate / a.trace_rate:g}"]
    else:
        cmd += ["--workload", "mixed", *a.workload.split(), "--num-prompts", str(a.num_prompts),
                "--arrival", arrival, "--request-rate", f"{rate:g}"]
        if arrival == "gamma":
            cmd += ["--burstiness", str(a.burstiness)]
    la = loadavg()
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    d.mkdir(parents=True, exist_ok=True)
    (d / "loadtest.out").write_text(p.stdout + p.stderr)
    log(out, {"run": d.name, "tag": tag, "mode": mode, "arrival": arrival, "rate": rate, "rep": rep, "seed": seed,
              "budget": c.budget, "loadavg_before": la, "loadavg_after": loadavg(), "wall_s": round(time.monotonic() - t0, 1),
              "rc": p.returncode})


def run_name(tag: str, mode: str, budget: int, arrival: str, rate: float, rep: int) -> str:
    b = f"_b{budget}" if tag == "budget" else ""
    return f"{tag}_{mode}{b}_{arrival}_r{rate:g}_rep{rep}"


def block(out: Path, a: argparse.Namespace, mode: str, budget: int, tag: str, runs: list[tuple[str, float, int]]) -> None:
    todo = [r for r in runs if not (out / "runs" / run_name(tag, mode, budget, *r) / "requests.csv").exists()]
    if not todo:
        return
    if a.deadline and time.time() > a.deadline:
        log(out, {"skipped_block": f"{tag} {mode}", "why": "past --stop-after"})
        return
    name = f"{tag}-{mode}-b{budget}-{int(time.time())}"
    la = loadavg()
    c = Cluster(out, name, [*MODES[mode], "--max-num-batched-tokens", str(budget)])
    c.budget = budget
    try:
        log(out, {"block": name, "cmd": " ".join(c.cmd[1:]).replace(str(ROOT) + "/", ""), "start_s": round(c.start_s, 1),
                  "loadavg_before_start": la})
        for arrival, rate, rep in todo:
            if a.deadline and time.time() > a.deadline:
                log(out, {"skipped": f"{arrival} {rate} rep{rep}", "why": "past --stop-after"})
                continue
            loadtest(out, a, c, mode, arrival, rate, rep, tag)
        log(out, {"block_cpu_s": name, "n_runs": len(todo), "cpu": c.cpu_used()})
    finally:
        c.stop()


def cmd_idle(a: argparse.Namespace) -> None:
    """CPU seconds each process of an idle cluster burns in --idle-s seconds (the floor under the
    per-request CPU figures: polling, heartbeats)."""
    for mode in ("disagg", "colocated"):
        c = Cluster(a.out, f"idle-{mode}-{int(time.time())}", [*MODES[mode], "--max-num-batched-tokens", "256"])
        try:
            time.sleep(2)
            c.cpu0 = cpu_times.snapshot(c.proc.pid)
            time.sleep(a.idle_s)
            log(a.out, {"idle_cpu_s": mode, "seconds": a.idle_s, "cpu": c.cpu_used(), "loadavg": loadavg()})
        finally:
            c.stop()


def cmd_run(a: argparse.Namespace) -> None:
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    write_trace(out / "trace.jsonl", a.num_prompts, a.trace_rate)
    top = a.budget_rate
    # 1. the colocated budget sweep (Poisson, highest rate)
    if a.budget is None:
        for b in a.budgets:
            block(out, a, "colocated", b, "budget", [("poisson", top, rep) for rep in range(a.reps)])
        best = pick_budget(out, a)
    else:
        best = a.budget
    log(out, {"colocated_budget": best})
    # 2. the comparison: alternating blocks, one repeat per block pair
    points = [(arr, r) for arr in ARRIVALS for r in a.rates]
    for rep in range(a.reps):
        order = ["disagg", "colocated"] if rep % 2 == 0 else ["colocated", "disagg"]
        for mode in order:
            block(out, a, mode, best if mode == "colocated" else a.disagg_budget, "cmp",
                  [(arr, r, rep) for arr, r in points])
    analyze(out)


# ---------------------------------------------------------------------------------------------- analysis
def run_metrics(d: Path) -> dict | None:
    if not (d / "requests.csv").exists() or not (d / "report.json").exists():
        return None
    rep = json.loads((d / "report.json").read_text())
    s = rep["runs"][0]["summary"]
    rows = list(csv.DictReader(open(d / "requests.csv")))
    planned, dur = s["planned"], s["duration_s"]
    ok = [r for r in rows if r["status"] == "OK"]

    def f(x: str) -> float | None:
        return float(x) if x not in ("", None) else None

    m = {"planned": planned, "completed": len(ok), "failed": planned - len(ok), "duration_s": dur}
    for name, ttft, tpot in SLOS:
        good = sum(1 for r in ok if f(r["ttft_ms"]) is not None and f(r["ttft_ms"]) <= ttft
                   and (f(r["tpot_ms"]) or 0.0) <= tpot)
        m[f"goodput {name}"] = good / dur if dur else 0.0
        m[f"attain {name}"] = good / planned
    tt = sorted(f(r["ttft_ms"]) for r in ok)
    tp = sorted(f(r["tpot_ms"]) for r in ok if f(r["tpot_ms"]) is not None)
    q = lambda v, p: v[min(len(v) - 1, int(round(p * (len(v) - 1))))] if v else float("nan")  # noqa: E731
    m.update({"ttft p50": q(tt, .5), "ttft p90": q(tt, .9), "tpot p50": q(tp, .5), "tpot p90": q(tp, .9)})
    return m


def collect(out: Path) -> list[dict]:
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()] if (out / "log.jsonl").exists() else []
    res = []
    for r in recs:
        if "run" not in r:
            continue
        m = run_metrics(out / "runs" / r["run"])
        if m is not None:
            res.append({**r, **m})
    return res


def spread(v: list[float]) -> tuple[float, float, float]:
    return (statistics.median(v), min(v), max(v)) if v else (float("nan"),) * 3


def pick_budget(out: Path, a: argparse.Namespace) -> int:
    res = [r for r in collect(out) if r["tag"] == "budget"]
    score = {}
    for b in a.budgets:
        rs = [r for r in res if r["budget"] == b]
        if rs:
            score[b] = statistics.mean(spread([r[f"goodput {n}"] for r in rs])[0] for n, _, _ in SLOS)
    log(out, {"budget_scores": score})
    return max(score, key=lambda b: (score[b], -b))


def fmt(t: tuple[float, float, float], d: int = 2) -> str:
    return f"{t[0]:.{d}f} ({t[1]:.{d}f}–{t[2]:.{d}f})"


def analyze(out: Path) -> None:
    res = collect(out)
    lines = []
    bud = [r for r in res if r["tag"] == "budget"]
    if bud:
        lines += ["## Colocated chunked-prefill budget sweep (Poisson, --budget-rate)", "",
                  "| budget | n | " + " | ".join(f"goodput {n} req/s" for n, _, _ in SLOS) + " | TTFT p90 ms | TPOT p90 ms |",
                  "|---|---|" + "---|" * (len(SLOS) + 2)]
        for b in sorted({r["budget"] for r in bud}):
            rs = [r for r in bud if r["budget"] == b]
            lines.append(f"| {b} | {len(rs)} | " + " | ".join(fmt(spread([r[f'goodput {n}'] for r in rs])) for n, _, _ in SLOS)
                         + f" | {fmt(spread([r['ttft p90'] for r in rs]), 0)} | {fmt(spread([r['tpot p90'] for r in rs]), 0)} |")
        lines.append("")
    cmp_ = [r for r in res if r["tag"] == "cmp"]
    summary = []
    if cmp_:
        lines += ["## Comparison: goodput req/s, median (min–max) over repeats; D = 1P+1D, C = colocated ×2", "",
                  "| arrival | rate | n D/C | " + " | ".join(f"{n} D | {n} C" for n, _, _ in SLOS)
                  + " | TTFT p90 ms D / C | TPOT p90 ms D / C | failed D/C |",
                  "|---|---|---|" + "---|---|" * len(SLOS) + "---|---|---|"]
        for arr in ARRIVALS:
            for rate in sorted({r["rate"] for r in cmp_}):
                D = [r for r in cmp_ if r["arrival"] == arr and r["rate"] == rate and r["mode"] == "disagg"]
                C = [r for r in cmp_ if r["arrival"] == arr and r["rate"] == rate and r["mode"] == "colocated"]
                if not D and not C:
                    continue
                row = f"| {arr} | {rate:g} | {len(D)}/{len(C)} | "
                srow = {"arrival": arr, "rate": rate, "nD": len(D), "nC": len(C)}
                for n, _, _ in SLOS:
                    sd, sc = spread([r[f"goodput {n}"] for r in D]), spread([r[f"goodput {n}"] for r in C])
                    row += f"{fmt(sd)} | {fmt(sc)} | "
                    srow[n] = (sd, sc)
                row += (f"{spread([r['ttft p90'] for r in D])[0]:.0f} / {spread([r['ttft p90'] for r in C])[0]:.0f} | "
                        f"{spread([r['tpot p90'] for r in D])[0]:.0f} / {spread([r['tpot p90'] for r in C])[0]:.0f} | "
                        f"{sum(r['failed'] for r in D)}/{sum(r['failed'] for r in C)} |")
                lines.append(row)
                summary.append(srow)
        lines += ["", "SLO attainment (share of the planned requests that met the pair; failed and unsent = miss), "
                  "median (min–max), and the winner: D or C when its min–max range lies wholly above the other's, "
                  "d or c when only its median is higher, = when the medians are equal", "",
                  "| arrival | rate | " + " | ".join(f"{n} D | {n} C | win" for n, _, _ in SLOS) + " |",
                  "|---|---|" + "---|---|---|" * len(SLOS)]
        for arr in ARRIVALS:
            for rate in sorted({r["rate"] for r in cmp_}):
                D = [r for r in cmp_ if r["arrival"] == arr and r["rate"] == rate and r["mode"] == "disagg"]
                C = [r for r in cmp_ if r["arrival"] == arr and r["rate"] == rate and r["mode"] == "colocated"]
                if not D or not C:
                    continue
                row = f"| {arr} | {rate:g} | "
                for n, _, _ in SLOS:
                    sd, sc = spread([r[f"attain {n}"] for r in D]), spread([r[f"attain {n}"] for r in C])
                    win = ("D" if sd[1] > sc[2] else "C" if sc[1] > sd[2] else
                           "d" if sd[0] > sc[0] else "c" if sc[0] > sd[0] else "=")
                    row += f"{fmt(sd)} | {fmt(sc)} | {win} | "
                lines.append(row.rstrip())
        lines += ["", "Goodput as DistServe defines it: the highest tested rate (req/s) up to which the median SLO "
                  "attainment over the repeats is >= 90 % at every tested rate (0 = not even the lowest; ≥: the highest tested), D / C", "",
                  "| arrival | " + " | ".join(SLO_HDR) + " |", "|---|" + "---|" * len(SLOS)]
        for arr in ARRIVALS:
            row = f"| {arr} | "
            for n, _, _ in SLOS:
                best = {}
                all_rates = sorted({r["rate"] for r in cmp_})
                for mode in ("disagg", "colocated"):
                    best[mode] = "0"
                    for rate in all_rates:  # up to the first rate that misses
                        v = [r[f"attain {n}"] for r in cmp_ if r["arrival"] == arr and r["rate"] == rate and r["mode"] == mode]
                        if not v or statistics.median(v) < 0.9:
                            break
                        best[mode] = f"≥ {rate:g}" if rate == all_rates[-1] else f"{rate:g}"
                row += f"{best['disagg']} / {best['colocated']} | "
            lines.append(row.rstrip())
        lines.append("")
    lines += cpu_split(out)
    la = [r["loadavg_before"][0] for r in res]
    if la:
        lines.append(f"Load average (1 min) before the {len(la)} runs: median {statistics.median(la):.2f}, "
                     f"min {min(la):.2f}, max {max(la):.2f}.")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    with open(out / "runs.csv", "w", newline="") as f:
        keys = ["run", "tag", "mode", "budget", "arrival", "rate", "rep", "seed", "loadavg_before", "loadavg_after",
                "wall_s", "rc", "planned", "completed", "failed", "duration_s",
                *[f"goodput {n}" for n, _, _ in SLOS], *[f"attain {n}" for n, _, _ in SLOS],
                "ttft p50", "ttft p90", "tpot p50", "tpot p90"]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in res:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    print("\n".join(lines))
    plot(out, cmp_, bud)


def cpu_split(out: Path) -> list[str]:
    """Each block's CPU seconds per request and role: a role's capacity on one core is 1 / (its CPU s per
    request), so the rate-matched prefill:decode split is (prefill CPU s per request) : (decode CPU s per request)."""
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    lines, n, cur = [], 0, None
    rows = []
    for r in recs:
        if "block" in r:
            cur, n = r["block"], 0
        elif "run" in r and cur:
            m = run_metrics(out / "runs" / r["run"])
            n += m["planned"] if m else 0
        elif "block_cpu_s" in r and r["block_cpu_s"] == cur and n:
            cpu = r["cpu"]
            role = lambda k: sum(v for key, v in cpu.items() if key.startswith(k))  # noqa: E731
            cluster = sum(v for k, v in cpu.items() if not k.startswith("machine"))
            rows.append((cur, n, role("prefill"), role("decode"), role("colocated"), role("router"),
                         cpu["machine (all processes)"] - cluster))
    if rows:
        lines += ["", "## CPU seconds per request, by role (per block; 'others' = machine - cluster, includes the harness)", "",
                  "| block | requests | prefill | decode | colocated (both) | router | others (whole block, CPU s) |",
                  "|---|---|---|---|---|---|---|"]
        for b, n, p, d, c, ro, o in rows:
            lines.append(f"| {b} | {n} | {p / n:.2f} | {d / n:.2f} | {c / n:.2f} | {ro / n:.3f} | {o:.0f} |")
        dis = [(p / n, d / n) for b, n, p, d, c, ro, o in rows if p > 0]
        if dis:
            pr = statistics.median(x[0] for x in dis)
            dr = statistics.median(x[1] for x in dis)
            lines.append(f"\nDisaggregated blocks, median: prefill {pr:.2f} CPU s/request, decode {dr:.2f} -> "
                         f"rate-matched split P:D = {pr / dr:.2f} : 1.")
    return lines


def plot(out: Path, cmp_: list[dict], bud: list[dict]) -> None:
    for key, fname, ylab, title in (
            ("goodput", "goodput.png", "goodput (req/s)",
             "Goodput = requests meeting the pair / run duration (vLLM's), median and min–max of the repeats (dotted: offered rate)"),
            ("attain", "attainment.png", "SLO attainment",
             "SLO attainment = share of planned requests meeting the pair (failed = miss), median and min–max")):
        if cmp_:
            plot_grid(out, cmp_, key, fname, ylab, title)
    if bud:
        plot_budget(out, bud)


def plot_grid(out: Path, cmp_: list[dict], key: str, fname: str, ylab: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = sorted({r["rate"] for r in cmp_})
    fig, axes = plt.subplots(len(SLOS), len(ARRIVALS), figsize=(12, 9), sharex=True, squeeze=False)
    for i, (n, ttft, tpot) in enumerate(SLOS):
        for j, arr in enumerate(ARRIVALS):
            ax = axes[i][j]
            for k, (mode, col) in enumerate((("disagg", "tab:blue"), ("colocated", "tab:orange"))):
                xs, med, lo, hi = [], [], [], []
                for rate in rates:
                    v = [r[f"{key} {n}"] for r in cmp_ if r["arrival"] == arr and r["rate"] == rate and r["mode"] == mode]
                    if v:
                        m, a_, b_ = spread(v)
                        xs.append(rate * (0.98 if k == 0 else 1.02))
                        med.append(m)
                        lo.append(m - a_)
                        hi.append(b_ - m)
                ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=4, color=col,
                            label="1P+1D" if mode == "disagg" else "colocated ×2")
            if key == "goodput":
                ax.plot(rates, rates, ":", color="grey", lw=0.8)
            else:
                ax.axhline(0.9, ls=":", color="grey", lw=0.8)
            ax.set_title(f"{arr} · {n} (TTFT≤{ttft / 1000:g}s, TPOT≤{tpot}ms)", fontsize=9)
            if i == len(SLOS) - 1:
                ax.set_xlabel("offered rate (req/s)")
            if j == 0:
                ax.set_ylabel(ylab)
            ax.set_ylim(bottom=0, top=1.05 if key == "attain" else None)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=90)
    plt.close(fig)


def plot_budget(out: Path, bud: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bs = sorted({r["budget"] for r in bud})
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, _, _ in SLOS:
        s = [spread([r[f"goodput {n}"] for r in bud if r["budget"] == b]) for b in bs]
        ax.errorbar(bs, [x[0] for x in s], yerr=[[x[0] - x[1] for x in s], [x[2] - x[0] for x in s]],
                    marker="o", capsize=4, label=n)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_xlabel("colocated --max-num-batched-tokens")
    ax.set_ylabel("goodput (req/s)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Colocated budget sweep (Poisson), median and min–max")
    fig.tight_layout()
    fig.savefig(out / "budget_sweep.png", dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["run", "analyze", "idle"])
    p.add_argument("--idle-s", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=ROOT / "docs/bench/fair_disagg_vs_colocated")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0, 2.0, 4.0])
    p.add_argument("--budget-rate", type=float, default=2.0, help="the rate (Poisson) of the budget sweep")
    p.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256, 512])
    p.add_argument("--budget", type=int, default=None, help="skip the sweep: the colocated budget")
    p.add_argument("--disagg-budget", type=int, default=256, help="the disaggregated workers' budget")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--workload", default="--input-len 64 --output-len 16 --long-input-len 1024 "
                                         "--long-output-len 8 --long-fraction 0.25")
    p.add_argument("--burstiness", type=float, default=0.25)
    p.add_argument("--trace-rate", type=float, default=0.5, help="the synthetic trace's own mean rate")
    p.add_argument("--stop-after", default=None, help="UTC HH:MM: start no run after it")
    a = p.parse_args()
    a.deadline = None
    if a.stop_after:
        h, m = map(int, a.stop_after.split(":"))
        now = time.gmtime()
        a.deadline = time.time() + ((h * 60 + m) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    if a.what == "run":
        cmd_run(a)
    elif a.what == "idle":
        cmd_idle(a)
    else:
        analyze(a.out)


if __name__ == "__main__":
    main()
