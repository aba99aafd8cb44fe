"""PNG plots drawn from report documents (``report.report_dict`` or a loaded JSON).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly,
never ``pyplot``: no global backend state, no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_LATENCIES = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E latency"))
Series = Sequence[tuple[str, dict[str, Any]]]  # (legend name, run)


def _values_ms(run: dict[str, Any], key: str) -> np.ndarray:
    ok = [r for r in run["requests"] if r["status"] == "OK"]
    if key == "itl_s":
        vals = [b - a for r in ok for a, b in zip(r["chunk_times_s"], r["chunk_times_s"][1:])]
    else:
        vals = [r[key] for r in ok if r[key] is not None]
    return np.sort(np.asarray(vals, dtype=np.float64)) * 1000.0


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _rate(run: dict[str, Any]) -> float | None:
    a = run["arrival"]
    rate = a.get("rate")
    return float(rate) if a.get("process") in ("poisson", "gamma") and isinstance(rate, (int, float)) else None


def _cdf_row(axes: Sequence[Any], series: Series, styles: Sequence[dict[str, Any]]) -> None:
    for ax, (key, title) in zip(axes, _LATENCIES):
        for (name, run), style in zip(series, styles):
            v = _values_ms(run, key)
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=name, **style)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    if series:
        axes[0].legend(fontsize=7)


def plot_latency_cdfs(series: Series, path: Path) -> Path:
    fig = Figure(figsize=(14, 3.6))
    _cdf_row(fig.subplots(1, 4), series, [{}] * len(series))
    return _save(fig, path)


def plot_throughput(series: Series, path: Path, bin_s: float | None = None) -> Path:
    """Completed and failed requests/s and output tokens/s over each run's time."""
    fig = Figure(figsize=(11, 3.8))
    ax_req, ax_tok = fig.subplots(1, 2)
    for name, run in series:
        reqs = run["requests"]
        ends = [r["start_s"] + r["end_s"] for r in reqs if r["end_s"] is not None]
        horizon = max(ends, default=1.0)
        width = bin_s or max(horizon / 30.0, 0.25)
        edges = np.arange(0.0, horizon + width, width)
        done = [r["start_s"] + r["end_s"] for r in reqs if r["status"] == "OK"]
        failed = [r["start_s"] + r["end_s"] for r in reqs if r["status"] != "OK" and r["end_s"] is not None]
        tok_t = [r["start_s"] + t for r in reqs for t in r["chunk_times_s"]]
        tok_w = [n for r in reqs for n in r["chunk_tokens"]]
        mid = edges[:-1] + width / 2
        line = ax_req.plot(mid, np.histogram(done, edges)[0] / width, label=f"{name} completed")[0]
        if failed:
            ax_req.plot(mid, np.histogram(failed, edges)[0] / width, ls=":", color=line.get_color(),
                        label=f"{name} failed")
        ax_tok.plot(mid, np.histogram(tok_t, edges, weights=tok_w)[0] / width, label=name)
    ax_req.set(title="requests over time", xlabel="s since run start", ylabel="requests/s")
    ax_tok.set(title="output tokens over time", xlabel="s since run start", ylabel="tokens/s")
    for ax in (ax_req, ax_tok):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _sweep_row(ax_good: Any, ax_tpot: Any, docs: Sequence[tuple[str, dict[str, Any]]],
               slo: dict[str, Any] | None) -> None:
    for (name, doc), ls in zip(docs, ("-", "--", ":", "-.")):
        pts = sorted((_rate(r), r["summary"]) for r in doc["runs"] if _rate(r) is not None)
        if not pts:
            continue
        x = [p[0] for p in pts]
        ax_good.plot(x, [p[1]["request_throughput"] or 0 for p in pts], ls=ls, marker=".",
                     alpha=0.5, label=f"{name} throughput")
        if pts[0][1].get("goodput") is not None:
            ax_good.plot(x, [p[1]["goodput"] or 0 for p in pts], ls=ls, marker="o", label=f"{name} goodput")
        ax_tpot.plot(x, [p[1]["tpot_ms"]["p99"] if p[1]["tpot_ms"]["p99"] is not None else np.nan for p in pts],
                     ls=ls, marker="o", label=name)
    if slo and slo.get("tpot_ms"):
        ax_tpot.axhline(slo["tpot_ms"], color="red", lw=0.8, label="TPOT SLO")
    ax_good.set(title="goodput vs request rate", xlabel="offered request rate (req/s)", ylabel="req/s")
    ax_tpot.set(title="p99 TPOT vs request rate", xlabel="offered request rate (req/s)", ylabel="ms")
    for ax in (ax_good, ax_tpot):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def plot_sweep(doc: dict[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(11, 3.8))
    _sweep_row(*fig.subplots(1, 2), [("", doc)], doc.get("slo"))
    return _save(fig, path)


def plot_compare(a: tuple[str, dict[str, Any]], b: tuple[str, dict[str, Any]], path: Path) -> Path:
    """Latency CDFs of both reports (A solid, B dashed); rate curves when either is a sweep."""
    sweep = len(a[1]["runs"]) > 1 or len(b[1]["runs"]) > 1
    fig = Figure(figsize=(14, 7.2 if sweep else 3.8))
    grid = fig.add_gridspec(2 if sweep else 1, 4)
    series, styles = [], []
    for (name, doc), ls in ((a, "-"), (b, "--")):
        for i, run in enumerate(doc["runs"]):
            series.append((f"{name}: {run['label']}", run))
            styles.append({"ls": ls, "color": f"C{i % 10}"})
    _cdf_row([fig.add_subplot(grid[0, i]) for i in range(4)], series, styles)
    if sweep:
        _sweep_row(fig.add_subplot(grid[1, 0:2]), fig.add_subplot(grid[1, 2:4]), [a, b],
                   a[1].get("slo") or b[1].get("slo"))
    return _save(fig, path)


def plot_report(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every plot of one report, into ``out_dir``."""
    series = [(run["label"], run) for run in doc["runs"]]
    paths = [plot_latency_cdfs(series, out_dir / "latency_cdf.png"),
             plot_throughput(series, out_dir / "throughput.png")]
    if sum(_rate(r) is not None for r in doc["runs"]) > 1:
        paths.append(plot_sweep(doc, out_dir / "sweep.png"))
    return paths
