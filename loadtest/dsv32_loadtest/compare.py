"""``--compare A.json B.json``: two reports side by side, with B/A ratios.

Two single runs get a full table; two sweeps get one row per request rate the
two have in common (a disaggregated-vs-colocated comparison runs the same
``--request-rate`` list against both); other multi-run reports pair by position.
For two sweeps with a TPOT SLO it also names, for each report, the first rate
at which its p99 TPOT exceeds the SLO, and the p99 TPOT ratio there.
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
