"""The Prometheus metrics of every process (router, prefill, decode, colocated).

Names follow the Prometheus conventions (base units, ``_seconds``, ``_bytes``,
counters end in ``_total`` on the wire); every series carries ``model`` (the
served model name) and ``role``. A process binds its two labels once at start
(:func:`init`) and gets a :class:`ProcessMetrics`; code that records reads it
with :func:`process`. What each role fills in:

=====================================  =========  ===========================================
metric                                 kind       roles
=====================================  =========  ===========================================
dsv32_requests_total{status}           counter    router (gRPC code), workers (finished, failed, aborted)
dsv32_request_retries_total{reason}    counter    router
dsv32_inflight_requests                gauge      router (admitted), workers (computing / in the batch)
dsv32_waiting_requests                 gauge      router (waiting for admission), workers (queued)
dsv32_time_to_first_token_seconds      histogram  router
dsv32_time_per_output_token_seconds    histogram  router
dsv32_inter_token_latency_seconds      histogram  router
dsv32_e2e_request_latency_seconds      histogram  router
dsv32_request_queue_time_seconds       histogram  router (admission), prefill (queue before compute)
dsv32_prompt_tokens_total              counter    router, prefill, colocated
dsv32_generation_tokens_total          counter    router, decode, colocated
dsv32_kv_cache_used_pages              gauge      workers
dsv32_kv_cache_total_pages             gauge      workers
dsv32_prefill_step_seconds             histogram  prefill
dsv32_decode_step_seconds              histogram  decode, colocated
dsv32_kv_transfer_bytes_total{dir.}    counter    prefill (sent), decode (received)
dsv32_kv_transfer_seconds              histogram  prefill (begin → last send), decode (Decode call → KV verified)
dsv32_kv_checksum_failures_total       counter    decode
dsv32_engine_last_step_timestamp_seconds gauge    workers (the engine loop's heartbeat)
=====================================  =========  ===========================================
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

LABELS = ("model", "role")
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_E2E = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)

REQUESTS = Counter("dsv32_requests", "Finished requests by status (router: gRPC code)", [*LABELS, "status"])
RETRIES = Counter("dsv32_request_retries", "Attempts retried on another worker pair, by reason", [*LABELS, "reason"])
INFLIGHT = Gauge("dsv32_inflight_requests", "Requests running (router: admitted and not finished)", LABELS)
WAITING = Gauge("dsv32_waiting_requests", "Requests waiting (router: for admission; workers: queued)", LABELS)
TTFT = Histogram("dsv32_time_to_first_token_seconds", "Time to first token", LABELS, buckets=_TTFT)
TPOT = Histogram("dsv32_time_per_output_token_seconds", "Mean time per output token after the first", LABELS,
                 buckets=_TPOT)
ITL = Histogram("dsv32_inter_token_latency_seconds", "Time between consecutive output tokens", LABELS, buckets=_TPOT)
E2E = Histogram("dsv32_e2e_request_latency_seconds", "Request latency, arrival to last token", LABELS, buckets=_E2E)
QUEUE_TIME = Histogram("dsv32_request_queue_time_seconds", "Time a request waited before being worked on", LABELS,
                       buckets=_LATENCY)
PROMPT_TOKENS = Counter("dsv32_prompt_tokens", "Prompt tokens (router: admitted; workers: prefilled)", LABELS)
GENERATION_TOKENS = Counter("dsv32_generation_tokens", "Generated tokens", LABELS)
KV_USED = Gauge("dsv32_kv_cache_used_pages", "KV-cache pages in use on this worker", LABELS)
KV_TOTAL = Gauge("dsv32_kv_cache_total_pages", "KV-cache pages of this worker's pool", LABELS)
PREFILL_STEP = Histogram("dsv32_prefill_step_seconds", "Duration of one prefill batch's forward", LABELS,
                         buckets=_LATENCY)
DECODE_STEP = Histogram("dsv32_decode_step_seconds", "Duration of one decode engine step", LABELS, buckets=_LATENCY)
TRANSFER_BYTES = Counter("dsv32_kv_transfer_bytes", "KV-cache bytes transferred", [*LABELS, "direction"])
TRANSFER_SECONDS = Histogram("dsv32_kv_transfer_seconds", "Duration of one request's KV transfer", LABELS,
                             buckets=_LATENCY)
CHECKSUM_FAILURES = Counter("dsv32_kv_checksum_failures", "KV transfers that failed verification", LABELS)
LAST_STEP = Gauge("dsv32_engine_last_step_timestamp_seconds", "Unix time of the engine loop's last iteration", LABELS)

FAMILIES = (REQUESTS, RETRIES, INFLIGHT, WAITING, TTFT, TPOT, ITL, E2E, QUEUE_TIME, PROMPT_TOKENS, GENERATION_TOKENS,
            KV_USED, KV_TOTAL, PREFILL_STEP, DECODE_STEP, TRANSFER_BYTES, TRANSFER_SECONDS, CHECKSUM_FAILURES,
            LAST_STEP)


def exported_names() -> dict[str, tuple[str, ...]]:
    """Every series name a scrape can show (``_total``, ``_bucket``, ``_sum``, ``_count`` included)
    -> its label names; what dashboards and autoscalers may refer to."""
    out = {}
    for m in FAMILIES:
        labels = tuple(m._labelnames)
        if isinstance(m, Counter):
            out[m._name + "_total"] = labels
        elif isinstance(m, Histogram):
            out[m._name + "_bucket"] = (*labels, "le")
            out[m._name + "_sum"] = out[m._name + "_count"] = labels
        else:
            out[m._name] = labels
    return out


class ProcessMetrics:
    """The families bound to this process's ``model`` and ``role``."""

    def __init__(self, model: str, role: str):
        self.model, self.role = model, role
        lv = (model, role)
        self.inflight, self.waiting = INFLIGHT.labels(*lv), WAITING.labels(*lv)
        self.ttft, self.tpot, self.itl, self.e2e = (h.labels(*lv) for h in (TTFT, TPOT, ITL, E2E))
        self.queue_time = QUEUE_TIME.labels(*lv)
        self.prompt_tokens, self.generation_tokens = PROMPT_TOKENS.labels(*lv), GENERATION_TOKENS.labels(*lv)
        self.prefill_step, self.decode_step = PREFILL_STEP.labels(*lv), DECODE_STEP.labels(*lv)
        self.transfer_seconds = TRANSFER_SECONDS.labels(*lv)
        self.checksum_failures = CHECKSUM_FAILURES.labels(*lv)
        self.last_step = LAST_STEP.labels(*lv)
        self.last_step_at = time.monotonic()
        """Monotonic time of the engine loop's last step (read by :mod:`.liveness`)."""

    def requests(self, status: str):
        return REQUESTS.labels(self.model, self.role, status)

    def retries(self, reason: str):
        return RETRIES.labels(self.model, self.role, reason)

    def transfer_bytes(self, direction: str):
        return TRANSFER_BYTES.labels(self.model, self.role, direction)

    def step_beat(self) -> None:
        """The engine loop went round once (read by the worker's liveness check)."""
        self.last_step_at = time.monotonic()
        self.last_step.set(time.time())

    def watch_load(self, load) -> None:
        """Gauges read at scrape time from ``load()`` (a :class:`~dsv32_cluster.heartbeat.WorkerLoad`)."""
        self.kv_used, self.kv_total = KV_USED.labels(self.model, self.role), KV_TOTAL.labels(self.model, self.role)
        self.kv_used.set_function(lambda: (lambda w: w.total_pages - w.free_pages)(load()))
        self.kv_total.set_function(lambda: load().total_pages)
        self.inflight.set_function(lambda: load().running)
        self.waiting.set_function(lambda: load().queued_requests)


_process: ProcessMetrics | None = None


def init(model: str, role: str) -> ProcessMetrics:
    """Bind this process's labels (once, at start; a second call rebinds, for in-process tests)."""
    global _process
    _process = ProcessMetrics(model, role)
    return _process


def process() -> ProcessMetrics:
    """This process's metrics (bound to ``model=""`` and ``role="unknown"`` if :func:`init` was never called)."""
    return _process if _process is not None else init("", "unknown")
