"""Prometheus metrics: the names (:mod:`dsv32_cluster.metrics`), the Grafana dashboard that reads
them, and a scrape of every process of an ``up --metrics-port BASE`` cluster after a request."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from dsv32_cluster import liveness, metrics
from upproc import up

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dsv32-serve.json"


def _exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def test_names_follow_prometheus_conventions():
    for name, labels in metrics.exported_names().items():
        assert re.fullmatch(r"dsv32_[a-z0-9_]+", name), name
        assert labels[:2] == ("model", "role"), (name, labels)
    for m in metrics.FAMILIES:
        kind = type(m).__name__
        if kind == "Histogram":
            assert m._name.endswith("_seconds"), m._name
        if "bytes" in m._name:
            assert m._name.endswith("_bytes"), m._name


def test_every_dashboard_expression_uses_exported_metrics():
    exported = metrics.exported_names()
    used = set()
    for expr in _exprs():
        names = set(re.findall(r"\bdsv32_[a-z0-9_]+", expr))
        assert names, f"no dsv32 metric in {expr!r}"
        missing = names - set(exported)
        assert not missing, f"{expr!r}: {missing} not exported"
        for name in names:  # label matchers and groupings name labels the series have
            for group in re.findall(name + r"\{([^}]*)\}", expr):
                for label in re.findall(r"(\w+)\s*=~?", group):
                    assert label in exported[name], (expr, label)
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert label in {"le", "instance"} | {lb for n in names for lb in exported[n]}, (expr, label)
        used |= names
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families == {m._name for m in metrics.FAMILIES}, "every family on the dashboard, nothing else"


def _free_run(n: int) -> int:
    """A base port with ``n`` consecutive ports free a moment ago."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def _scrape(port: int) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("dsv32_"):
                out.setdefault(s.name, []).append(s)
    return out


def _health(endpoint: str, service: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(endpoint) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _total(samples: dict[str, list], name: str, **labels) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


# what each role must show with a non-zero value after one request
EXPECTED = {
    "router": ["dsv32_requests_total", "dsv32_time_to_first_token_seconds_count",
               "dsv32_time_per_output_token_seconds_count", "dsv32_inter_token_latency_seconds_count",
               "dsv32_e2e_request_latency_seconds_count", "dsv32_request_queue_time_seconds_count",
               "dsv32_prompt_tokens_total", "dsv32_generation_tokens_total"],
    "prefill": ["dsv32_requests_total", "dsv32_request_queue_time_seconds_count", "dsv32_prompt_tokens_total",
                "dsv32_prefill_step_seconds_count", "dsv32_kv_transfer_bytes_total", "dsv32_kv_transfer_seconds_count",
                "dsv32_kv_cache_total_pages", "dsv32_engine_last_step_timestamp_seconds"],
    "decode": ["dsv32_requests_total", "dsv32_generation_tokens_total", "dsv32_decode_step_seconds_count",
               "dsv32_kv_transfer_bytes_total", "dsv32_kv_transfer_seconds_count", "dsv32_kv_cache_total_pages",
               "dsv32_engine_last_step_timestamp_seconds"],
}


@pytest.mark.slow
def test_up_metrics_ports_and_a_scrape_of_every_process(tiny_model, tmp_path):
    from dsv32_router.client import generate

    base = _free_run(3)
    with up(tiny_model, "--metrics-port", str(base), "--log-dir", str(tmp_path)) as (target, proc):
        printed = dict(re.findall(r"up: metrics (\S+) http://[^:]+:(\d+)/metrics", "".join(proc.err)))
        ports = {name: int(p) for name, p in printed.items()}
        assert set(ports) == {"router", "prefill-0", "decode-0"}, printed
        assert sorted(ports.values()) == [base, base + 1, base + 2] and ports["router"] == base
        completion = generate(target, [1, 2, 3, 4, 5], max_tokens=4, temperature=0.0)
        assert len(completion.token_ids) == 4
        model = os.path.basename(tiny_model)
        for name, port in ports.items():
            role = name.split("-")[0]
            deadline = time.monotonic() + 10  # workers count a request when it ends, just after the stream
            while True:
                samples = _scrape(port)
                zero = [m for m in EXPECTED[role] if _total(samples, m, model=model, role=role) <= 0]
                if not zero or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert not zero, f"{name}: zero or missing {zero}"
            if role != "router":
                assert _total(samples, "dsv32_kv_cache_total_pages", role=role) == 32
                assert time.time() - _total(samples, "dsv32_engine_last_step_timestamp_seconds") < 60
        router = _scrape(ports["router"])
        assert _total(router, "dsv32_requests_total", status="OK") == 1
        assert _total(router, "dsv32_generation_tokens_total") == 4
        assert _total(router, "dsv32_prompt_tokens_total") == 5
        for wid in ("prefill-0", "decode-0"):  # the liveness service of a stepping engine loop
            endpoint = re.findall(r"listening (\S+)", (tmp_path / f"{wid}.log").read_text())[-1]
            assert _health(endpoint, liveness.SERVICE) == "SERVING", wid
        sent = _total(_scrape(ports["prefill-0"]), "dsv32_kv_transfer_bytes_total", direction="sent")
        received = _total(_scrape(ports["decode-0"]), "dsv32_kv_transfer_bytes_total", direction="received")
        assert sent == received > 0
