"""Tracing and metrics, both off unless asked for.

Tracing (OpenTelemetry): ``--otel-exporter`` / ``DSV32_OTEL_EXPORTER`` =
``none`` (default) | ``console`` | ``otlp`` | ``otlp-grpc`` | ``otlp-http``
(endpoint, headers and TLS from the standard ``OTEL_EXPORTER_OTLP_*``
variables), ``--otel-sample-ratio`` the share of traces kept. When on, the gRPC
instrumentation propagates ``traceparent`` from the client through the router
to the workers; the spans of one request are in :mod:`.tracing`. When off, the
API's no-op tracer costs next to nothing.

Metrics (Prometheus): ``--metrics-port`` / ``DSV32_METRICS_PORT`` starts the
standard ``/metrics`` HTTP endpoint (0 or unset = off); the names are in
:mod:`.metrics`.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from prometheus_client import start_http_server

log = logging.getLogger(__name__)

EXPORTERS = ("none", "console", "otlp", "otlp-grpc", "otlp-http")
"""``otlp`` takes its protocol from the standard ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` /
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc``, the default, or ``http/protobuf``); the other two name it."""


def tracer(name: str = "dsv32"):
    return trace.get_tracer(name)


def _otlp_exporter(kind: str):
    protocol = {"otlp-grpc": "grpc", "otlp-http": "http/protobuf"}.get(kind) or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise SystemExit(f"OTLP protocol must be grpc or http/protobuf, got {protocol!r}")
    return OTLPSpanExporter()  # endpoint, headers, TLS: the standard OTEL_EXPORTER_OTLP_* variables


def setup_tracing(service_name: str, exporter: str | None = None, sample_ratio: float | None = None) -> bool:
    """Install a tracer provider; returns whether tracing is on.

    ``sample_ratio`` (``--otel-sample-ratio``, default 1): the share of new traces kept; a process
    called with a ``traceparent`` follows its caller's decision, so a trace is whole or absent.
    """
    exporter = (exporter or os.environ.get("DSV32_OTEL_EXPORTER") or "none").lower()
    if exporter not in EXPORTERS:
        raise SystemExit(f"--otel-exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "none":
        return False
    ratio = 1.0 if sample_ratio is None else float(sample_ratio)
    if not 0.0 <= ratio <= 1.0:
        raise SystemExit(f"--otel-sample-ratio must be within [0, 1], got {ratio}")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    try:
        span_exporter = ConsoleSpanExporter() if exporter == "console" else _otlp_exporter(exporter)
    except ImportError as e:
        raise SystemExit(f"--otel-exporter {exporter} needs the opentelemetry-exporter-otlp package "
                           f"(pip install opentelemetry-exporter-otlp==1.45.2): {e}") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                              sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    return True


def _not_health():
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.health_check())  # probes every few seconds would drown the requests' traces


def grpc_server_interceptors(aio: bool, enabled: bool) -> list:
    if not enabled:
        return []
    from opentelemetry.instrumentation import grpc as otel_grpc

    return ([otel_grpc.aio_server_interceptor(filter_=_not_health())] if aio
            else [otel_grpc.server_interceptor(filter_=_not_health())])


def grpc_client_interceptors(aio: bool, enabled: bool) -> list | None:
    if not enabled:
        return None
    from opentelemetry.instrumentation import grpc as otel_grpc

    return (otel_grpc.aio_client_interceptors(filter_=_not_health()) if aio
            else [otel_grpc.client_interceptor(filter_=_not_health())])


def start_metrics(port: int | None, host: str = "127.0.0.1") -> int | None:
    port = int(port if port is not None else os.environ.get("DSV32_METRICS_PORT", "0") or 0)
    if port <= 0:
        return None
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return port
