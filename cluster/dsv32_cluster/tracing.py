"""The spans of one request, and the attribute names they carry.

One trace per request (``traceparent`` travels in gRPC metadata)::

    client
    └─ router  /dsv32.serving.v1.Generation/Generate   request id, model, prompt/completion tokens, worker ids
       ├─ admit        waiting for a router slot
       ├─ reserve      choosing the pair, pages reserved on the decode worker
       ├─ prefill      the router's Prefill call
       │  └─ prefill worker  /dsv32.worker.v1.PrefillWorker/Prefill
       │     ├─ queue          waiting for a batch
       │     ├─ compute        the batch's forward; one ``send_layer`` span per layer handed to the sender
       │     └─ transfer       bytes, pages, checksum time, wait after the last layer
       └─ decode       the router's Decode stream
          └─ decode worker  /dsv32.worker.v1.DecodeWorker/Decode
             ├─ kv_wait        Decode call → KV verified (bytes received)
             └─ (events) first_token; completion tokens as an attribute

Work done on a loop thread (the prefill batch, the layer sends) is timed there and written as
spans afterwards, in the RPC's context, with their measured start and end (:func:`span_between`).
"""

from __future__ import annotations

import time

from opentelemetry import trace

REQUEST_ID = "dsv32.request_id"
MODEL = "gen_ai.request.model"
PROMPT_TOKENS = "gen_ai.usage.input_tokens"
COMPLETION_TOKENS = "gen_ai.usage.output_tokens"
PREFILL_WORKER = "dsv32.prefill_worker"
DECODE_WORKER = "dsv32.decode_worker"
WORKER = "dsv32.worker_id"
ATTEMPT = "dsv32.attempt"


def tracer():
    return trace.get_tracer("dsv32")


def wall_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` reading as Unix time in ns (what span timestamps are)."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def span_between(name: str, start_s: float, end_s: float, attributes: dict | None = None):
    """A span, child of the current one, from ``start_s`` to ``end_s`` (monotonic seconds), already
    ended; returned so that children can be written under it (:func:`child_between`)."""
    span = tracer().start_span(name, start_time=wall_ns(start_s), attributes=attributes or {})
    span.end(end_time=wall_ns(max(start_s, end_s)))
    return span


def child_between(parent, name: str, start_s: float, end_s: float, attributes: dict | None = None) -> None:
    """A span under ``parent`` (a span already ended is fine) from ``start_s`` to ``end_s``."""
    ctx = trace.set_span_in_context(parent)
    span = tracer().start_span(name, context=ctx, start_time=wall_ns(start_s), attributes=attributes or {})
    span.end(end_time=wall_ns(max(start_s, end_s)))


def current() -> trace.Span:
    return trace.get_current_span()
