"""Tracing over OTLP (gRPC and HTTP/protobuf) into a receiver stub that decodes the export requests:
one connected trace per request with the named spans and attributes, every span closed in time."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from dsv32_proto import serving_pb2, serving_pb2_grpc
from upproc import up

pytestmark = pytest.mark.slow
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP trace receiver: ``protocol`` ``grpc`` or ``http/protobuf``; ``spans`` as decoded dicts."""

    def __init__(self, protocol: str):
        self.protocol, self.spans, self.lock = protocol, [], threading.Lock()
        if protocol == "grpc":
            self.server = grpc.server(futures.ThreadPoolExecutor(4))
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self._GrpcService(self), self.server)
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            self.server.start()
        else:
            receiver = self

            class Handler(BaseHTTPRequestHandler):
                def do_POST(self):
                    assert self.path == "/v1/traces", self.path
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                    receiver.take(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                    out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)

                def log_message(self, *args):
                    pass

            self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            self.port = self.server.server_address[1]
            threading.Thread(target=self.server.serve_forever, daemon=True).start()

    class _GrpcService(trace_service_pb2_grpc.TraceServiceServicer):
        def __init__(self, receiver):
            self.receiver = receiver

        def Export(self, request, context):
            self.receiver.take(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    def take(self, req: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for rs in req.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {a.key: _value(a.value) for a in s.attributes}
                    with self.lock:
                        self.spans.append({"service": service, "name": s.name, "trace_id": s.trace_id.hex(),
                                           "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                                           "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                                           "attrs": attrs, "events": [e.name for e in s.events]})

    def stop(self) -> None:
        if self.protocol == "grpc":
            self.server.stop(0)
        else:
            self.server.shutdown()


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_one_connected_trace_per_request_over_otlp(tiny_model, tmp_path, protocol):
    receiver = Receiver(protocol)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    try:
        with up(tiny_model, "--otel-exporter", "otlp", "--log-dir", str(tmp_path), env=env) as (target, proc):
            with grpc.insecure_channel(target) as ch:
                req = serving_pb2.GenerateRequest(request_id="traced-1")
                req.token_ids.ids.extend([1, 2, 3, 4, 5])
                req.sampling.max_tokens, req.sampling.temperature = 4, 0.0
                t_sent = time.time_ns()
                msgs = list(serving_pb2_grpc.GenerationStub(ch).Generate(
                    req, metadata=[("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01")], timeout=60))
                t_done = time.time_ns()
            assert sum(len(m.token_ids) for m in msgs) == 4
            names = {"admit", "reserve", "prefill", "decode", "queue", "compute", "send_layer", "transfer", "kv_wait"}
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                with receiver.lock:
                    got = {s["name"] for s in receiver.spans}
                decode_calls = {s["service"] for s in receiver.spans if s["name"].endswith("/Decode")}
                if names <= got and decode_calls == {"dsv32-router", "dsv32-decode"}:
                    break
                time.sleep(0.2)
        spans = list(receiver.spans)
    finally:
        receiver.stop()
    assert spans and {s["trace_id"] for s in spans} == {TRACE_ID}, "one trace, the client's (health checks untraced)"
    by_id = {s["span_id"]: s for s in spans}
    assert not names - {s["name"] for s in spans}, f"missing spans {names - {s['name'] for s in spans}}"
    # connected: every span's parent is in the trace, up to the client's span
    for s in spans:
        assert s["parent"] == CLIENT_SPAN or s["parent"] in by_id, f"{s['name']} ({s['service']}) is orphaned"
    router_calls = {s["name"] for s in spans if s["service"] == "dsv32-router"}
    for call in ("DecodeWorker/Reserve", "PrefillWorker/Prefill", "DecodeWorker/Decode"):
        assert f"/dsv32.worker.v1.{call}" in router_calls, f"the router's {call} client span never ended"
    root = next(s for s in spans if s["parent"] == CLIENT_SPAN)
    assert root["name"] == "/dsv32.serving.v1.Generation/Generate" and root["service"] == "dsv32-router"

    def parent(s):
        return by_id[s["parent"]]["name"]

    one = {s["name"]: s for s in spans}
    assert {parent(one[n]) for n in ("admit", "reserve", "prefill", "decode")} == {root["name"]}
    assert parent(one["queue"]) == parent(one["compute"]) == parent(one["transfer"]) \
        == "/dsv32.worker.v1.PrefillWorker/Prefill"
    assert parent(one["kv_wait"]) == "/dsv32.worker.v1.DecodeWorker/Decode"
    assert {parent(s) for s in spans if s["name"] == "send_layer"} == {"compute"}
    assert len([s for s in spans if s["name"] == "send_layer"]) >= 2, "one per layer"
    # attributes
    a = root["attrs"]
    assert a["dsv32.request_id"] == "traced-1" and a["gen_ai.request.model"]
    assert a["gen_ai.usage.input_tokens"] == 5 and a["gen_ai.usage.output_tokens"] == 4
    assert a["dsv32.prefill_worker"].startswith("prefill-0") and a["dsv32.decode_worker"].startswith("decode-0")
    t = one["transfer"]["attrs"]
    assert t["dsv32.transfer.bytes"] > 0 and t["dsv32.transfer.pages"] >= 1
    assert t["dsv32.transfer.checksum_s"] >= 0 and t["dsv32.transfer.wait_after_last_layer_s"] >= 0
    dec = next(s for s in spans if s["name"].endswith("/Decode") and s["service"] == "dsv32-decode")
    assert "first_token" in dec["events"] and dec["attrs"]["gen_ai.usage.output_tokens"] == 4
    # closed when their work ends: none outlives the request by more than 100 ms
    for s in spans:
        assert t_sent - 50_000_000 <= s["start"] <= s["end"], s["name"]
        assert s["end"] <= root["end"] + 100_000_000, f"{s['name']} ({s['service']}) outlived the request " \
            f"by {(s['end'] - root['end']) / 1e6:.0f} ms"
    assert root["end"] <= t_done + 100_000_000


def test_a_cancelled_request_closes_every_span(tiny_model, tmp_path):
    receiver = Receiver("grpc")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    try:
        with up(tiny_model, "--otel-exporter", "otlp", "--log-dir", str(tmp_path), env=env) as (target, proc):
            with grpc.insecure_channel(target) as ch:
                req = serving_pb2.GenerateRequest(request_id="cancelled-1")
                req.token_ids.ids.extend([1, 2, 3, 4, 5])
                req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = 400, 0.0, True
                call = serving_pb2_grpc.GenerationStub(ch).Generate(
                    req, metadata=[("traceparent", f"00-{trace_id}-{CLIENT_SPAN}-01")], timeout=60)
                n = 0
                for msg in call:
                    n += len(msg.token_ids)
                    if n >= 3:
                        call.cancel()
                        break
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                with receiver.lock:
                    decode_calls = {s["service"] for s in receiver.spans if s["name"].endswith("/Decode")}
                if decode_calls == {"dsv32-router", "dsv32-decode"}:
                    break
                time.sleep(0.2)
        spans = [s for s in receiver.spans if s["trace_id"] == trace_id]
    finally:
        receiver.stop()
    root = next(s for s in spans if s["parent"] == CLIENT_SPAN)
    assert {"/dsv32.worker.v1.DecodeWorker/Decode", "decode"} <= {s["name"] for s in spans if
                                                                  s["service"] == "dsv32-router"}
    for s in spans:
        assert s["end"] <= root["end"] + 100_000_000, f"{s['name']} ({s['service']}) outlived the cancelled " \
            f"request by {(s['end'] - root['end']) / 1e6:.0f} ms"
