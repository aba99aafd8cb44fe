"""``--compare A.json B.json``: two reports side by side, with B/A ratios.

Two single runs get a full table; two sweeps get one row per request rate the
two have in common (a disaggregated-vs-colocated comparison runs the same
``--request-rate`` list against both); other multi-run reports pair by position.
For two sweeps with a TPOT SLO it also names, for each report, the first rate
at which its p99 TPOT exceeds the SLO, and the p99 TPOT ratio there.

For each pair of runs it adds, where both have them: TTFT per turn (multi-turn
workloads), the workers' counters (``--worker-stats``), and the outputs: each
request of A against the request of B with the same ``index`` (the same
conversation and turn of the same workload), by ``output_hash``. With greedy
sampling the count that differ should be 0; a request whose twin failed or
that has no hash is *unverified*.
"""

from __future__ import annotations

from typing import Any

_ROWS = [
    ("completed", ("completed",)), ("failed", ("failed",)), ("not sent", ("not_sent",)),
    ("req/s", ("request_throughput",)), ("goodput req/s", ("goodput",)),
    ("output tok/s", ("output_throughput",)),
    *((f"{m.upper()} {s} ms", (f"{m}_ms", s)) for m in ("ttft", "tpot", "itl", "e2e")
      for s in ("mean", "median", "p90", "p99")),
]


def _get(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    v: Any = summary
    for k in path:
        v = v.get(k) if isinstance(v, dict) else None
    return v if isinstance(v, (int, float)) else None


def _f(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _run_table(name_a: str, run_a: dict[str, Any], name_b: str, run_b: dict[str, Any]) -> str:
    head = [f"{run_a['label']} | {run_b['label']}", name_a, name_b, "B/A"]
    rows = [head]
    for label, path in _ROWS:
        a, b = _get(run_a["summary"], path), _get(run_b["summary"], path)
        rows.append([label, _f(a), _f(b), _ratio(a, b)])
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def slo_crossing(doc: dict[str, Any], tpot_slo_ms: float) -> dict[str, Any] | None:
    """The lowest-rate run whose p99 TPOT exceeds ``tpot_slo_ms``, if any."""
    runs = [r for r in doc["runs"] if isinstance(r["arrival"].get("rate"), (int, float))]
    for run in sorted(runs, key=lambda r: r["arrival"]["rate"]):
        p99 = run["summary"]["tpot_ms"]["p99"]
        if p99 is not None and p99 > tpot_slo_ms:
            return run
    return None


def _pairs(doc_a: dict[str, Any], doc_b: dict[str, Any]) -> tuple[list[tuple[dict, dict]], str]:
    """Runs paired by equal offered rate when both are rate runs, else by position."""
    ra, rb = doc_a["runs"], doc_b["runs"]
    rates_a = [r["arrival"].get("rate") for r in ra]
    rates_b = [r["arrival"].get("rate") for r in rb]
    if len(ra) > 1 or len(rb) > 1:
        if all(isinstance(x, (int, float)) for x in rates_a + rates_b):
            by_rate = {r["arrival"]["rate"]: r for r in rb}
            pairs = [(r, by_rate[r["arrival"]["rate"]]) for r in ra if r["arrival"]["rate"] in by_rate]
            left = len(ra) + len(rb) - 2 * len(pairs)
            return pairs, f"({left} runs without a run at the same rate in the other report)" if left else ""
    n = min(len(ra), len(rb))
    note = f"(A has {len(ra)} runs, B has {len(rb)}: compared the first {n})" if len(ra) != len(rb) else ""
    return list(zip(ra[:n], rb[:n])), note


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.2f}x" if a and b is not None else "-"


def _sweep_table(pairs: list[tuple[dict, dict]]) -> str:
    keys = [("goodput", ("goodput",)), ("req/s", ("request_throughput",)),
            ("p99 TTFT", ("ttft_ms", "p99")), ("p99 TPOT", ("tpot_ms", "p99"))]
    head = ["rate"] + [f"{k} {x}" for k, _ in keys for x in ("A", "B", "B/A")]
    rows = [head]
    for ra, rb in pairs:
        row = [ra["label"] if ra["label"] == rb["label"] else f"{ra['label']} | {rb['label']}"]
        for _, path in keys:
            a, b = _get(ra["summary"], path), _get(rb["summary"], path)
            row += [_f(a), _f(b), _ratio(a, b)]
        rows.append(row)
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], "(latencies in ms, rates in req/s)"])


def _table(head: list[str], rows: list[list[str]], foot: str = "") -> str:
    rows = [head, *rows]
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], *([foot] if foot else [])])


def _turn_table(run_a: dict[str, Any], run_b: dict[str, Any]) -> str | None:
    a = {t["turn"]: t for t in run_a.get("summary_by_turn") or []}
    b = {t["turn"]: t for t in run_b.get("summary_by_turn") or []}
    if not a or not b:
        return None
    rows = []
    for turn in sorted(set(a) & set(b)):
        row = [str(turn + 1)]
        for stat in ("median", "p99"):
            x, y = a[turn]["ttft_ms"][stat], b[turn]["ttft_ms"][stat]
            row += [_f(x), _f(y), _ratio(x, y)]
        rows.append(row + [_f(a[turn]["mean_cached_tokens"]), _f(b[turn]["mean_cached_tokens"])])
    head = ["turn", "p50 TTFT A", "B", "B/A", "p99 TTFT A", "B", "B/A", "mean cached tok A", "B"]
    return _table(head, rows, "(TTFT in ms; turn 1 = a session's first)")


def _worker_table(run_a: dict[str, Any], run_b: dict[str, Any]) -> str | None:
    from .report import WORKER_TOTALS

    a, b = run_a.get("worker_stats"), run_b.get("worker_stats")
    if not a or not b:
        return None
    rows = [[name, _f(a["totals"][k]), _f(b["totals"][k]), _ratio(a["totals"][k], b["totals"][k])]
            for k, name in WORKER_TOTALS]
    notes = [f"{side}: {n}" for side, ws in (("A", a), ("B", b)) for n in ws["notes"]]
    return _table(["worker counters over the run", "A", "B", "B/A"], rows, "\n".join(notes))


def compare_outputs(pairs: list[tuple[dict, dict]]) -> dict[str, Any]:
    """Requests of A against B's request with the same ``index``, by ``output_hash``."""
    out = {"compared": 0, "identical": 0, "differ": 0, "unverified": 0, "differ_requests": []}
    for ra, rb in pairs:
        twins = {r["index"]: r for r in rb["requests"]}
        for r in ra["requests"]:
            twin = twins.get(r["index"])
            if not r.get("output_hash") or twin is None or not twin.get("output_hash"):
                out["unverified"] += 1
                continue
            out["compared"] += 1
            if r["output_hash"] == twin["output_hash"]:
                out["identical"] += 1
            else:
                out["differ"] += 1
                if len(out["differ_requests"]) < 10:
                    out["differ_requests"].append(f"index {r['index']} (session {r['session_id'] or '-'}, "
                                                  f"turn {r['turn'] + 1})")
    return out


def _outputs_text(pairs: list[tuple[dict, dict]], doc_a: dict[str, Any], doc_b: dict[str, Any]) -> str | None:
    o = compare_outputs(pairs)
    if not any(r.get("output_hash") for pair in pairs for run in pair for r in run["requests"]):
        return None  # reports from before output hashes, or nothing completed
    text = (f"outputs: {o['compared']} requests compared by index: {o['identical']} identical, {o['differ']} "
            f"differ, {o['unverified']} unverified (failed, missing or without a hash)")
    if o["differ_requests"]:
        text += "\n  first that differ: " + "; ".join(o["differ_requests"])
    temps = {(d.get("options") or {}).get("temperature") for d in (doc_a, doc_b)}
    if temps != {0}:
        text += (f"\n  (temperature {' / '.join(map(str, sorted(temps, key=str)))}: only greedy runs "
                 "(--temperature 0) are expected to match)")
    return text


def compare_text(a: tuple[str, dict[str, Any]], b: tuple[str, dict[str, Any]]) -> str:
    (name_a, doc_a), (name_b, doc_b) = a, b
    out = [f"A = {name_a}\nB = {name_b}"]
    pairs, note = _pairs(doc_a, doc_b)
    if len(pairs) == 1:
        out.append(_run_table("A", pairs[0][0], "B", pairs[0][1]))
    elif pairs:
        out.append(_sweep_table(pairs))
    if note:
        out.append(note)
    for ra, rb in pairs:
        extra = [t for t in (_turn_table(ra, rb), _worker_table(ra, rb)) if t]
        if extra and len(pairs) > 1:
            out.append(f"run {ra['label']} | {rb['label']}:")
        out += extra
    outputs = _outputs_text(pairs, doc_a, doc_b)
    if outputs:
        out.append(outputs)
    slo = (doc_a.get("slo") or {}).get("tpot_ms") or (doc_b.get("slo") or {}).get("tpot_ms")
    if slo and len(pairs) > 1:
        for name, doc, other in (("A", doc_a, doc_b), ("B", doc_b, doc_a)):
            run = slo_crossing(doc, slo)
            if run is None:
                out.append(f"{name}: p99 TPOT stays within the {slo:g} ms SLO at every rate")
                continue
            rate = run["arrival"]["rate"]
            mine = run["summary"]["tpot_ms"]["p99"]
            peer = next((r for r in other["runs"] if r["arrival"].get("rate") == rate), None)
            theirs = peer["summary"]["tpot_ms"]["p99"] if peer else None
            ratio = f"; {name} / other = {mine / theirs:.2f}x" if theirs else ""
            out.append(f"{name}: p99 TPOT first exceeds the {slo:g} ms SLO at {rate:g} req/s "
                       f"({mine:.1f} ms vs {_f(theirs)} ms{ratio})")
    return "\n\n".join(out)
