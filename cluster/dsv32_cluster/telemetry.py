"""Tracing and metrics, both off unless asked for.

Tracing (OpenTelemetry): ``--otel-exporter`` / ``DSV32_OTEL_EXPORTER`` =
``none`` (default) | ``console`` | ``otlp`` (needs the optional
``opentelemetry-exporter-otlp`` package; endpoint from the standard
``OTEL_EXPORTER_OTLP_ENDPOINT``). When on, the gRPC instrumentation propagates
``traceparent`` from the client through the router to the workers, and the
router opens one span per phase (``admit``, ``reserve``, ``prefill``,
``decode``) under the request's span. When off, the API's no-op tracer costs
next to nothing.

Metrics (Prometheus): ``--metrics-port`` / ``DSV32_METRICS_PORT`` starts the
standard ``/metrics`` HTTP endpoint (0 or unset = off). Every process
(router, workers) registers the same names with a ``role`` label.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

EXPORTERS = ("none", "console", "otlp")

REQUESTS = Counter("dsv32_requests", "Finished Generate calls by gRPC status code", ["role", "code"])
RETRIES = Counter("dsv32_retries", "Attempts retried on another pair, by reason", ["reason"])
INFLIGHT = Gauge("dsv32_inflight_requests", "Requests admitted and not finished", ["role"])
WAITING = Gauge("dsv32_waiting_requests", "Requests waiting for admission", ["role"])
TTFT = Histogram("dsv32_time_to_first_token_seconds", "Time to first token",
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TPOT = Histogram("dsv32_time_per_output_token_seconds", "Mean time per output token after the first",
                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
TOKENS = Counter("dsv32_tokens", "Tokens processed", ["role", "kind"])


def tracer(name: str = "dsv32"):
    return trace.get_tracer(name)


def setup_tracing(service_name: str, exporter: str | None = None) -> bool:
    """Install a tracer provider; returns whether tracing is on."""
    exporter = (exporter or os.environ.get("DSV32_OTEL_EXPORTER") or "none").lower()
    if exporter not in EXPORTERS:
        raise ValueError(f"--otel-exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "none":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            raise RuntimeError("--otel-exporter otlp needs the opentelemetry-exporter-otlp package") from e
        span_exporter = OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    return True


def grpc_server_interceptors(aio: bool, enabled: bool) -> list:
    if not enabled:
        return []
    from opentelemetry.instrumentation import grpc as otel_grpc

    return [otel_grpc.aio_server_interceptor()] if aio else [otel_grpc.server_interceptor()]


def grpc_client_interceptors(aio: bool, enabled: bool) -> list | None:
    if not enabled:
        return None
    from opentelemetry.instrumentation import grpc as otel_grpc

    return otel_grpc.aio_client_interceptors() if aio else [otel_grpc.client_interceptor()]


def start_metrics(port: int | None, host: str = "127.0.0.1") -> int | None:
    port = int(port if port is not None else os.environ.get("DSV32_METRICS_PORT", "0") or 0)
    if port <= 0:
        return None
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return port
