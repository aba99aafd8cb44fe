"""``dsv32-serve loadtest``: load-test a running cluster through the public gRPC API.

Exit status: 0 when the report is written and requests completed; 1 when the
run was cut short (the target went away, Ctrl-C) or nothing completed — the
partial report is still written; 2 on a usage error, an unreachable target or
a malformed trace (one line on stderr, no report).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from .arrivals import PROCESSES, Arrival
from .tokens import SOURCES

EPILOG = """examples:
  dsv32-serve loadtest --input-len 512 --output-len 128 --request-rate 2 --num-prompts 200
  dsv32-serve loadtest --workload mixed --request-rate 0.5,1,2,4 --slo ttft=2000,tpot=200
  dsv32-serve loadtest --arrival closed --concurrency 8 --num-prompts 64
  dsv32-serve loadtest --workload trace --trace mooncake.jsonl --trace-time-scale 4
  dsv32-serve loadtest --workload sessions --turns 6 --temperature 0 --arrival closed --concurrency 4 --worker-stats
  dsv32-serve loadtest --compare disagg/report.json coloc/report.json

exit status: 0 = report written (failed requests are counted in it); 1 = the run
was cut short (target gone, Ctrl-C) or nothing completed, partial report written;
2 = usage error, unreachable target or malformed trace (one line on stderr)."""


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rates like 1 or 0.5,1,2, got {text!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"request rates must be > 0 (inf = all at once), got {text!r}")
    return rates


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    g = p.add_argument_group("target")
    g.add_argument("--target", default="127.0.0.1:50051", help="gRPC address of the router (any host: a "
                   "Helm or Ray deployment too); "
                   "with --backend openai its HTTP address (HOST:PORT or http://HOST:PORT/v1)")
    g.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                   help="the router's gRPC Generate, or its OpenAI HTTP API (streamed /v1/completions)")
    g.add_argument("--model", default="", help="model id to request (default: the served model)")
    g.add_argument("--connections", type=int, default=4, help="gRPC connections to share among requests")
    g.add_argument("--api-token", default=None, metavar="TOKEN",
                   help="the router's public API token, sent as 'authorization: Bearer TOKEN' (gRPC) or "
                        "'Authorization: Bearer TOKEN' (HTTP) (default: $DSV32_API_TOKEN, or the file "
                        "$DSV32_API_TOKEN_FILE); prefer the variable: a command line is visible in ps. "
                        "Never written to the report")
    g.add_argument("--wait-for-server", type=float, default=0.0, metavar="S",
                   help="keep probing an unreachable target for S seconds before giving up")

    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=("synthetic", "mixed", "sessions", "trace"), default="synthetic")
    g.add_argument("--num-prompts", type=int, default=None,
                   help="requests in all (default 100; a trace: all its lines)")
    g.add_argument("--input-len", type=int, default=None, help="prompt tokens (sessions: new tokens per turn)")
    g.add_argument("--output-len", type=int, default=None, help="generated tokens (exact: ignore_eos)")
    g.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [L(1-r), L(1+r)]")
    g.add_argument("--long-input-len", type=int, default=2048, help="mixed: prompt tokens of long requests")
    g.add_argument("--long-output-len", type=int, default=16, help="mixed: output tokens of long requests")
    g.add_argument("--long-fraction", type=float, default=0.25, help="mixed: share of long requests")
    g.add_argument("--turns", type=int, default=4, help="sessions: turns per session")
    g.add_argument("--shared-prefix-len", type=int, default=256, help="sessions: shared system-prompt tokens")
    g.add_argument("--prefix-groups", type=int, default=1, help="sessions: distinct shared prefixes")
    g.add_argument("--think-time", type=float, default=0.0, metavar="S", help="sessions: pause between turns")
    g.add_argument("--trace", help="trace: JSONL file in the Mooncake shape")
    g.add_argument("--trace-time-scale", type=float, default=1.0, help="trace: replay speed-up factor")
    g.add_argument("--trace-block-size", type=int, default=512, help="trace: tokens per hash id")
    g.add_argument("--prompt-source", choices=SOURCES, default="ids",
                   help="ids: ordinary token ids; text: tokenized random words (dsv32_text.tokenizer)")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (lengths are then no longer exact)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: server's)")
    g.add_argument("--seed", type=int, default=0, help="seeds prompts, lengths and arrivals")

    g = p.add_argument_group("arrivals")
    g.add_argument("--arrival", choices=PROCESSES, default=None,
                   help="poisson (default) | gamma (see --burstiness) | burst (all at once) | closed "
                        "(--concurrency users) | trace (the trace's timestamps; the default with --workload trace)")
    g.add_argument("--request-rate", type=_rates, default=[1.0], metavar="R[,R...]",
                   help="requests/s (sessions: session starts/s); a list runs a sweep, one run per rate")
    g.add_argument("--fixed-schedule", action="store_true",
                   help="replay the trace's timestamps exactly (--workload trace; scaled by --trace-time-scale); "
                        "the same as --arrival trace")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, <1 burstier")
    g.add_argument("--concurrency", type=int, default=None,
                   help="cap on requests in flight; the number of users for --arrival closed")

    g = p.add_argument_group("limits and SLO")
    g.add_argument("--max-duration", type=float, default=600.0, metavar="S",
                   help="no request starts later than S seconds into a run")
    g.add_argument("--request-timeout", type=float, default=300.0, metavar="S", help="deadline of each request")
    g.add_argument("--abort-after-unavailable", type=int, default=10, metavar="N",
                   help="stop a run after N consecutive UNAVAILABLE errors (the target is gone)")
    g.add_argument("--slo", default=None, metavar="ttft=MS,tpot=MS,e2e=MS", help="SLOs for goodput (any subset)")
    g.add_argument("--metric-percentiles", default="99", metavar="P[,P...]",
                   help="percentiles of the vLLM-style keys of report.json (p99_ttft_ms...), as vllm bench serve")

    g = p.add_argument_group("fault injection (a cluster on this machine; see chaos.py)")
    g.add_argument("--chaos", choices=("kill-decode", "stop-decode", "kill-prefill"), default=None,
                   help="hit one worker of the role every --chaos-every seconds (SIGKILL, or SIGSTOP for "
                        "--chaos-stop seconds) while the load runs, then the same load again without faults "
                        "to compare each request's tokens (greedy: --temperature defaults to 0); report.json "
                        "gets a 'chaos' section")
    g.add_argument("--chaos-every", type=float, default=10.0, metavar="S")
    g.add_argument("--chaos-stop", type=float, default=8.0, metavar="S", help="stop-decode: seconds stopped")
    g.add_argument("--chaos-redis-url", default=os.environ.get("DSV32_REDIS_URL", "redis://127.0.0.1:6379/0"),
                   help="the cluster's Redis (its worker registry: pids; default $DSV32_REDIS_URL)")
    g.add_argument("--chaos-redis-prefix", default="dsv32:")

    g = p.add_argument_group("cluster counters")
    g.add_argument("--worker-stats", action="store_true",
                   help="read every registered worker's Stats before and after each run (workers from the "
                        "Redis registry at --chaos-redis-url / --chaos-redis-prefix) and report the differences: "
                        "prefill tokens computed, KV bytes moved, prefix-cached tokens (the whole cluster's)")

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, default=None,
                   help="where report.json, requests.csv and the plots go (default loadtest_results/<time>)")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print two saved reports side by side (B/A ratios) and plot them together")


def _workload(a: argparse.Namespace) -> Any:
    from .workloads import MixedWorkload, SessionWorkload, SyntheticWorkload, TraceWorkload

    lens = {k: v for k, v in (("input_len", a.input_len), ("output_len", a.output_len)) if v is not None}
    common = {"seed": a.seed}
    if a.workload == "synthetic":
        return SyntheticWorkload(range_ratio=a.range_ratio, **lens, **common)
    if a.workload == "mixed":
        return MixedWorkload(long_input_len=a.long_input_len, long_output_len=a.long_output_len,
                             long_fraction=a.long_fraction, range_ratio=a.range_ratio, **lens, **common)
    if a.workload == "sessions":
        return SessionWorkload(turns=a.turns, shared_prefix_len=a.shared_prefix_len,
                               prefix_groups=a.prefix_groups, range_ratio=a.range_ratio,
                               think_time_s=a.think_time, **lens, **common)
    if not a.trace:
        raise ValueError("--workload trace needs --trace FILE")
    if lens:
        raise ValueError("a trace brings its own lengths: drop --input-len/--output-len")
    return TraceWorkload(a.trace, block_size=a.trace_block_size, time_scale=a.trace_time_scale, **common)


def _plan(a: argparse.Namespace) -> tuple[Any, Arrival, list[float] | None, Any, dict[str, Any]]:
    from .metrics import Slo
    from .vllm_keys import parse_percentiles

    workload = _workload(a)
    rates = a.request_rate
    finite = all(math.isfinite(r) for r in rates)
    if a.fixed_schedule:
        if a.workload != "trace" or a.arrival not in (None, "trace"):
            raise ValueError("--fixed-schedule replays a trace's timestamps: it needs --workload trace and no "
                             "other --arrival")
        a.arrival = "trace"
    parse_percentiles(a.metric_percentiles)
    process = a.arrival or ("trace" if a.workload == "trace" else "poisson")
    if not finite and process in ("poisson", "gamma"):
        process = "burst"
    if len(rates) > 1 and not finite:
        raise ValueError("a rate sweep takes finite rates only")
    arrival = Arrival(process, rate=rates[0], burstiness=a.burstiness, concurrency=a.concurrency, seed=a.seed)
    sweep = rates if len(rates) > 1 else None
    options = dict(num_prompts=None if a.workload == "trace" else 100, connections=a.connections,
                   request_timeout_s=a.request_timeout, max_duration_s=a.max_duration, model=a.model,
                   ignore_eos=a.ignore_eos, temperature=a.temperature, prompt_source=a.prompt_source,
                   seed=a.seed, wait_for_server_s=a.wait_for_server,
                   abort_after_unavailable=a.abort_after_unavailable, progress=a.progress, handle_sigint=True,
                   backend=a.backend)
    if a.num_prompts is not None:
        options["num_prompts"] = a.num_prompts
    return workload, arrival, sweep, Slo.parse(a.slo) if a.slo else None, options


def _out_dir(a: argparse.Namespace) -> Path:
    d = a.output_dir or Path("loadtest_results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _error(msg: str) -> int:
    print(f"dsv32-serve loadtest: error: {msg}", file=sys.stderr)
    return 2


def _short_name(path: str) -> str:
    """``runs/disagg/report.json`` → ``disagg``; ``coloc.json`` → ``coloc``."""
    p = Path(path)
    return p.parent.name or p.stem if p.name == "report.json" else p.stem


def _compare(a: argparse.Namespace) -> int:
    from .compare import compare_text
    from .plots import plot_compare
    from .report import load_json

    try:
        docs = [(_short_name(p), load_json(p)) for p in a.compare]
    except ValueError as e:
        return _error(str(e))
    print(compare_text(docs[0], docs[1]))
    if a.plots:
        print(f"plot: {plot_compare(docs[0], docs[1], _out_dir(a) / 'compare.png')}")
    return 0


_URL_PASSWORD = re.compile(r"(\w+://[^/@:\s]*:)[^/@\s]+@")


def _hide_password(text: str) -> str:
    """``redis://:secret@host:1/0`` → ``redis://:***@host:1/0`` (a Redis URL may carry its password)."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def _redacted(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--api-token`` (or an abbreviation argparse takes) and the passwords in
    URLs replaced: the report must not carry a secret."""
    out, hide = [], False
    for x in argv:
        name, eq, _ = x.partition("=")
        is_flag = len(name) >= len("--api") and "--api-token".startswith(name)
        out.append("***" if hide else f"{name}=***" if is_flag and eq else _hide_password(x))
        hide = is_flag and not eq and not hide
    return out


def run(a: argparse.Namespace) -> int:
    if a.compare:
        return _compare(a)
    # gRPC core logs every GOAWAY of a dying server at INFO; the report already counts them.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from .client import TargetError
    from .plots import plot_report
    from .report import format_summary, format_sweep, report_dict, write_csv, write_json
    from .runner import run_load
    from .vllm_keys import parse_percentiles

    chaos = reference = None
    if a.chaos and a.temperature is None:
        a.temperature = 0.0  # greedy: the fault-free rerun must give the same tokens
    try:
        workload, arrival, sweep, slo, options = _plan(a)
        if a.chaos:
            from .chaos import Chaos

            chaos = Chaos(a.chaos, a.chaos_redis_url, a.chaos_redis_prefix, a.chaos_every, a.chaos_stop).start()
        if a.worker_stats:
            from .worker_stats import WorkerStatsReader

            options["worker_stats"] = WorkerStatsReader(a.chaos_redis_url, a.chaos_redis_prefix)
        try:
            report = run_load(a.target, workload, arrival, slo=slo, rates=sweep, api_token=a.api_token, **options)
        finally:
            if chaos is not None:
                chaos.stop()
        if chaos is not None and a.temperature == 0:
            print("chaos: the same load again without faults, to compare tokens", file=sys.stderr)
            reference = run_load(a.target, workload, arrival, slo=slo, rates=sweep, api_token=a.api_token,
                                 **options)
    except (TargetError, ValueError) as e:
        return _error(str(e))
    args = {k: (str(v) if isinstance(v, Path) else _hide_password(v) if isinstance(v, str) else v)
            for k, v in vars(a).items() if k not in ("func", "api_token")}
    argv = _redacted(sys.argv)
    doc = report_dict(report, command=shlex.join(argv), argv=argv, args=args,
                      percentiles=parse_percentiles(a.metric_percentiles))
    if chaos is not None:
        doc["chaos"] = chaos.summary()
        print(f"chaos: {a.chaos}: {len(chaos.faults)} faults, recovered {doc['chaos']['recovered']}, "
              f"recovery max {doc['chaos']['max_recovery_s']} s, mean {doc['chaos']['mean_recovery_s']} s")
        if reference is not None:
            from .chaos import compare_tokens, format_tokens

            doc["chaos"]["tokens"] = t = compare_tokens(report, reference)
            print(format_tokens(t))
            if t["differ"] or t["unclear_failures"]:
                doc["warnings"].append(f"chaos: {t['differ']} requests completed with tokens other than the "
                                       f"fault-free run's, {t['unclear_failures']} failed without a clear status")
        else:
            print(f"chaos: tokens not compared (temperature {a.temperature}: sampled, not reproducible)")
    out = _out_dir(a)
    write_json(doc, out / "report.json")
    write_csv(doc, out / "requests.csv")
    plots = plot_report(doc, out) if a.plots else []
    for w in doc["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if len(doc["runs"]) == 1:
        print(format_summary(doc["runs"][0]))
    rows = [row for r in doc["runs"] for row in
            [(r["label"], r["summary"]), *((f"  {k}", s) for k, s in r["summary_by_kind"].items())]]
    if len(rows) > 1:
        print(format_sweep(rows))
    print(f"report: {out / 'report.json'}  csv: {out / 'requests.csv'}"
          + "".join(f"  plot: {p}" for p in plots))
    cut_short = [r["aborted"] for r in doc["runs"] if r["aborted"] and not r["aborted"].startswith("time limit")]
    if cut_short or not any(r["summary"]["completed"] for r in doc["runs"]):
        print(f"dsv32-serve loadtest: run incomplete: {cut_short[0] if cut_short else 'no request completed'}"
              f"; partial report in {out}", file=sys.stderr)
        return 1
    return 0
