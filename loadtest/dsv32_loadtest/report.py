"""The report: one JSON document (``report_dict``), a CSV of requests, text tables.

Plots and ``--compare`` read the same JSON document, so a saved report and a
fresh run go through one code path. Schema (``schema_version`` 1)::

    {schema_version, tool, created_at, command, argv, args, target,
     server: {models: [{id, max_model_len, vocab_size, numerics}]},
     workload: {...}, options: {...}, slo: {ttft_ms, tpot_ms, e2e_ms} | null,
     warnings: [str],
     runs: [{label, arrival: {process, rate, burstiness, concurrency, seed},
             started_at, duration_s, aborted: str | null,
             summary: {...}, summary_by_kind: {kind: {...}},
             summary_by_turn: [{turn, sent, completed, mean_input_tokens, mean_cached_tokens,
                                ttft_ms: {...}, e2e_ms: {...}}],   # multi-turn only, turn 0 = first
             worker_stats: {totals, workers, notes} | null,      # --worker-stats
             requests: [RequestResult.to_dict(), ...]}]}

A request holds its raw timings (``start_s``, ``chunk_times_s`` from its
start, one per token-bearing chunk, with ``chunk_tokens``; ``end_s``) and the
derived ``ttft_s``, ``tpot_s``, ``e2e_s``; ITL is ``diff(chunk_times_s)``. Its
``output_hash`` stands for the token ids it received (``--compare`` matches two
runs' requests by ``index`` with it); ``cached_tokens`` is the server's count of
prompt tokens served from a prefix cache.

Non-finite numbers are written as the strings "inf" / "-inf" and ``null`` (NaN)
so that the file is strict JSON.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .runner import LoadReport
from .vllm_keys import flat_keys

SCHEMA_VERSION = 1
CSV_FIELDS = ["run", "index", "kind", "session_id", "turn", "request_id", "status", "error",
              "finish_reason", "scheduled_s", "start_s", "input_tokens", "requested_output_tokens",
              "output_tokens", "server_prompt_tokens", "server_completion_tokens", "cached_tokens", "ttft_ms",
              "tpot_ms", "e2e_ms", "itl_mean_ms", "itl_max_ms", "prefill_worker", "decode_worker", "output_hash"]


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def report_dict(report: LoadReport, command: str = "", argv: list[str] | None = None,
                args: dict[str, Any] | None = None, percentiles: Sequence[float] = (99.0,)) -> dict[str, Any]:
    """``percentiles``: the ``pNN_*_ms`` keys of the vLLM-style flat keys (:mod:`.vllm_keys`), which
    every run carries and the document's top level repeats for the first run."""
    slo = report.slo
    runs = [{
        "label": run.label,
        "arrival": asdict(run.arrival),
        "started_at": run.started_at,
        "duration_s": run.duration_s,
        "aborted": run.aborted,
        "summary": run.summary(slo),
        "summary_by_kind": run.summary_by_kind(slo),
        "summary_by_turn": run.summary_by_turn(),
        "worker_stats": run.worker_stats,
        "requests": [r.to_dict() for r in run.results],
        **flat_keys(run.results, run.summary(slo), percentiles),
    } for run in report.runs]
    flat = {k: runs[0][k] for k in flat_keys([], runs[0]["summary"], percentiles)} if runs else {}
    return _finite({
        **flat,
        "schema_version": SCHEMA_VERSION,
        "tool": "dsv32-serve loadtest",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "argv": list(argv or []),
        "args": args or {},
        "target": report.target,
        "server": {"models": report.models},
        "workload": report.workload,
        "options": asdict(report.options),
        "slo": asdict(slo) if slo is not None else None,
        "warnings": report.warnings,
        "runs": runs,
    })


def write_json(doc: dict[str, Any], path: Path) -> None:
    """Indented, except that each request is one line (a run may hold 100 000 of them)."""
    marks = {}
    runs = []
    for i, run in enumerate(doc["runs"]):
        marks[f"@@requests-{i}@@"] = run["requests"]
        runs.append({**run, "requests": f"@@requests-{i}@@"})
    text = json.dumps({**doc, "runs": runs}, indent=1, allow_nan=False)
    for mark, reqs in marks.items():
        body = ",\n".join(json.dumps(r, allow_nan=False, separators=(",", ":")) for r in reqs)
        text = text.replace(json.dumps(mark), f"[\n{body}\n   ]" if reqs else "[]", 1)
    path.write_text(text + "\n", encoding="utf-8")


def load_json(path: str | Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read report {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a JSON report ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        raise ValueError(f"{path} is not a loadtest report (no 'runs' list)")
    return doc


def _ms(v: Any) -> Any:
    return "" if v is None else round(v * 1000.0, 4)


def write_csv(doc: dict[str, Any], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for run in doc["runs"]:
            for r in run["requests"]:
                t = r["chunk_times_s"]
                itl = [b - a for a, b in zip(t, t[1:])]
                w.writerow({**r, "run": run["label"], "ttft_ms": _ms(r["ttft_s"]), "tpot_ms": _ms(r["tpot_s"]),
                            "e2e_ms": _ms(r["e2e_s"]),
                            "itl_mean_ms": _ms(sum(itl) / len(itl)) if itl else "",
                            "itl_max_ms": _ms(max(itl)) if itl else ""})


WORKER_TOTALS = [("prefill_tokens_computed", "Prefill tokens computed"), ("kv_bytes_sent", "KV bytes sent (prefill)"),
                 ("kv_bytes_received", "KV bytes received (decode)"),
                 ("cached_tokens_prefill", "Cached tokens (prefill workers)"),
                 ("cached_tokens_decode", "Cached tokens (decode workers)"),
                 ("cached_pages", "Cached pages at the end")]


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_summary(run: dict[str, Any]) -> str:
    """vLLM-style result block for one run."""
    s = run["summary"]
    lines = [f"{' ' + run['label'] + ' ':=^60}"]

    def row(name: str, v: Any) -> None:
        lines.append(f"{name:<44}{_fmt(v):>16}")

    row("Planned requests:", s["planned"])
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Not sent:", s["not_sent"])
    for code, n in s["errors"].items():
        row(f"  {code}:", n)
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    if s.get("total_cached_tokens") is not None:
        row("Input tokens from a prefix cache:", s["total_cached_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    if s.get("goodput") is not None:
        row("Request goodput (req/s):", s["goodput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency")):
        lines.append(f"{title:-^60}")
        short = key.split("_")[0].upper()
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat.capitalize() if stat[0] == 'm' else stat.upper()} {short} (ms):", s[key][stat])
    if run.get("summary_by_turn"):
        lines.append(f"{'TTFT per turn (ms)':-^60}")
        lines.append(f"{'turn':>4}{'ok':>6}{'in tok':>9}{'cached':>9}{'p50':>16}{'p99':>16}")
        for t in run["summary_by_turn"]:
            lines.append(f"{t['turn'] + 1:>4}{t['completed']:>6}{_fmt(t['mean_input_tokens'], 0):>9}"
                         f"{_fmt(t['mean_cached_tokens'], 0):>9}{_fmt(t['ttft_ms']['median']):>16}"
                         f"{_fmt(t['ttft_ms']['p99']):>16}")
    ws = run.get("worker_stats")
    if ws:
        lines.append(f"{'Worker counters over the run':-^60}")
        for key, name in WORKER_TOTALS:
            row(f"{name}:", ws["totals"][key])
        lines += [f"note: {n}" for n in ws["notes"]]
    lag = s.get("send_lag_ms", {})
    if lag.get("count"):
        lines.append(f"{'Schedule':-^60}")
        row("P99 send lag vs schedule (ms):", lag["p99"])
    if run.get("aborted"):
        lines.append(f"Stopped early: {run['aborted']}")
    lines.append("=" * 60)
    return "\n".join(lines)


def format_sweep(summaries: list[tuple[str, dict[str, Any]]]) -> str:
    """One row per (label, summary): the numbers a rate sweep is read by."""
    head = ["run", "ok", "fail", "req/s", "goodput", "out tok/s", "p99 TTFT", "p99 TPOT", "p99 ITL", "p99 E2E"]
    rows = [head]
    for label, s in summaries:
        rows.append([label, str(s["completed"]), str(s["failed"] + s["not_sent"]),
                     _fmt(s["request_throughput"]), _fmt(s.get("goodput")), _fmt(s["output_throughput"], 1),
                     *(_fmt(s[k]["p99"], 1) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:], "(latencies in ms; fail includes not sent)"])
