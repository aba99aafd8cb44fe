"""The fake worker services of the router tests, and the check that they cannot drift from the proto.

The fakes speak the internal worker protocol (``dsv32.worker.v1``) with a
deterministic "model": the token at absolute position ``pos`` is
``fake_token(seed, pos)``, so a retry that continues from prompt + generated
tokens must reproduce the same stream, and duplicated or lost tokens show.
Faults are scripted per test. :class:`FakeCluster` runs them on loopback and
heartbeats them into Redis; ``test_router.py`` puts a real router in front.

The tests here hold every fake to its service in the proto: each RPC is
implemented by the fake (not inherited from the generated servicer, which
answers UNIMPLEMENTED), with the proto's request and response types (the
annotations, and a real call through gRPC), unary or streaming as declared.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
import typing
from collections import deque
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from dsv32_cluster.state import ClusterState, WorkerInfo
from dsv32_proto import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc

PAGE = 64  # tokens per page of the fake pools, registered with the workers
_TRANSFER_FAULTS = ("corrupt_next_transfer", "corrupt_index", "corrupt_latent")  # as the real prefill worker


def fake_token(seed: int, pos: int) -> int:
    return 1000 + (seed * 31 + pos * 17) % 5000


class FakeDecode(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker_id: str, total_pages: int = 64):
        self.worker_id, self.total_pages = worker_id, total_pages
        self.committed: dict[str, int] = {}
        self.faults: deque = deque()  # "data_loss" | ("die_after", n) | ("slow", seconds per token)
        self.log: list[tuple[str, str]] = []  # (event, request id)
        self.lock = threading.Lock()

    def free(self) -> int:
        return self.total_pages - sum(self.committed.values())

    def Reserve(self, req: worker_pb2.ReserveRequest, ctx) -> worker_pb2.ReserveResponse:
        need = -(-(req.num_prompt_tokens + req.max_tokens) // PAGE)
        with self.lock:
            if need > self.free():
                ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
            self.committed[req.request_id] = need
        self.log.append(("reserve", req.request_id))
        return worker_pb2.ReserveResponse(decode_worker_id=self.worker_id, transfer_endpoint="127.0.0.1:1",
                                          transfer_id=f"t-{req.request_id}", page_ids=list(range(need)), page_size=PAGE)

    def Decode(self, req: worker_pb2.DecodeRequest, ctx) -> Iterator[worker_pb2.DecodeResponse]:
        rid = req.request_id
        fault = self.faults.popleft() if self.faults else None
        self.log.append(("decode", rid))
        ctx.add_callback(lambda: self._release(rid, "stream-ended"))
        if fault == "data_loss":
            self._release(rid, "checksum-failed")
            ctx.abort(grpc.StatusCode.DATA_LOSS, "KV checksum mismatch (fake)")
        yield worker_pb2.DecodeResponse(tokens=[req.first], received_bytes=req.sent_bytes, checksum=req.checksum)
        if req.first.finished:
            return
        delay = fault[1] if isinstance(fault, tuple) and fault[0] == "slow" else 0.0
        n_prompt, s = len(req.prompt_ids), req.sampling
        for i in range(1, s.max_tokens):
            if isinstance(fault, tuple) and fault[0] == "die_after" and i >= fault[1]:
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "decode worker died (fake)")
            if delay:
                time.sleep(delay)
            if not ctx.is_active():
                return
            tok = fake_token(s.seed, n_prompt + i)
            last = i == s.max_tokens - 1 or tok in s.stop_token_ids
            yield worker_pb2.DecodeResponse(tokens=[worker_pb2.Token(
                token_id=tok, finished=last, finish_reason=("stop" if tok in s.stop_token_ids else "length") if last else "")])
            if last:
                return

    def _release(self, rid: str, why: str) -> None:
        with self.lock:
            if self.committed.pop(rid, None) is not None:
                self.log.append((why, rid))

    def Cancel(self, req: worker_pb2.CancelRequest, ctx) -> worker_pb2.CancelResponse:
        with self.lock:
            found = self.committed.pop(req.request_id, None) is not None
        self.log.append(("cancel", req.request_id))
        return worker_pb2.CancelResponse(found=found)

    def Stats(self, req: worker_pb2.StatsRequest, ctx) -> worker_pb2.WorkerStats:
        with self.lock:
            return worker_pb2.WorkerStats(worker_id=self.worker_id, role="decode", free_pages=self.free(),
                                          total_pages=self.total_pages, running_requests=len(self.committed))

    def ReleaseSession(self, req: worker_pb2.ReleaseSessionRequest, ctx) -> worker_pb2.ReleaseSessionResponse:
        self.log.append(("release_session", req.session_id))
        return worker_pb2.ReleaseSessionResponse(released_pages=0)  # no prefix cache here

    def InjectFault(self, req: worker_pb2.FaultRequest, ctx) -> worker_pb2.FaultResponse:
        # as the real decode worker: tests script this fake's faults through ``faults``
        ctx.abort(grpc.StatusCode.UNIMPLEMENTED, "faults are injected on the prefill worker (the sending side)")


class FakePrefill(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker_id: str, transfer_faults: deque | None = None):
        self.worker_id = worker_id
        self.prompts: list[list[int]] = []
        self.faults: deque = deque()  # "unavailable" | "refuse_endpoint"
        # where InjectFault puts a corrupted transfer: the decode side is the one that notices
        self.transfer_faults = transfer_faults if transfer_faults is not None else deque()

    def Prefill(self, req: worker_pb2.PrefillRequest, ctx) -> worker_pb2.PrefillResponse:
        self.prompts.append(list(req.prompt_ids))
        fault = self.faults.popleft() if self.faults else None
        if fault == "unavailable":
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker died (fake)")
        if fault == "refuse_endpoint":  # as the real one when D left the registry after the reservation
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"transfer_endpoint: {req.decode_worker_id!r} is not a registered decode worker")
        s = req.sampling
        tok = fake_token(s.seed, len(req.prompt_ids))
        last = s.max_tokens == 1 or tok in s.stop_token_ids
        first = worker_pb2.Token(token_id=tok, finished=last, finish_reason=("length" if last else ""))
        return worker_pb2.PrefillResponse(first=first, checksum="crc32:0", sent_bytes=123,
                                          prompt_tokens=len(req.prompt_ids))

    def Cancel(self, req: worker_pb2.CancelRequest, ctx) -> worker_pb2.CancelResponse:
        return worker_pb2.CancelResponse(found=False)  # Prefill answers at once: nothing is ever queued here

    def Stats(self, req: worker_pb2.StatsRequest, ctx) -> worker_pb2.WorkerStats:
        return worker_pb2.WorkerStats(worker_id=self.worker_id, role="prefill", requests_finished=len(self.prompts))

    def ReleaseSession(self, req: worker_pb2.ReleaseSessionRequest, ctx) -> worker_pb2.ReleaseSessionResponse:
        return worker_pb2.ReleaseSessionResponse(released_pages=0)

    def InjectFault(self, req: worker_pb2.FaultRequest, ctx) -> worker_pb2.FaultResponse:
        if req.kind in _TRANSFER_FAULTS:
            self.transfer_faults.extend(["data_loss"] * max(1, req.count))
        elif req.kind in ("none", ""):
            for _ in range(self.transfer_faults.count("data_loss")):
                self.transfer_faults.remove("data_loss")
        else:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kind: unknown fault {req.kind!r}")
        return worker_pb2.FaultResponse()


def serve_fake(svc) -> tuple[grpc.Server, int]:
    """``svc`` on a loopback gRPC server of its own; returns the server and its port."""
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    if isinstance(svc, FakeDecode):
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(svc, srv)
    else:
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(svc, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    return srv, port


class FakeCluster:
    """Fake workers in this process, heartbeating into Redis; the router is a real subprocess."""

    def __init__(self, redis_url: str, prefix: str, n_prefill=1, n_decode=1, decode_pages=64):
        self.state = ClusterState.from_url(redis_url, prefix)
        self.decode = {f"fd{i}": FakeDecode(f"fd{i}", decode_pages) for i in range(n_decode)}
        self.decode_faults = deque()  # consumed by whichever decode worker serves next
        for d in self.decode.values():
            d.faults = self.decode_faults
        self.prefill = {f"fp{i}": FakePrefill(f"fp{i}", self.decode_faults) for i in range(n_prefill)}
        self.servers, self.infos = [], []
        for wid, svc in [*self.decode.items(), *self.prefill.items()]:
            srv, port = serve_fake(svc)
            self.servers.append(srv)
            role = "decode" if isinstance(svc, FakeDecode) else "prefill"
            self.infos.append((WorkerInfo(wid, role, f"127.0.0.1:{port}", total_pages=decode_pages, page_size=PAGE),
                               svc))
        self._stop = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def beat(self) -> None:
        for info, svc in self.infos:
            if isinstance(svc, FakeDecode):
                info.free_pages = svc.free()
                info.running = len(svc.committed)
            self.state.heartbeat(info)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self.beat()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for info, _ in self.infos:
            self.state.deregister(info.worker_id)
        for srv in self.servers:
            srv.stop(None)


# -- the fakes against the proto ---------------------------------------------------
FAKES = [("DecodeWorker", FakeDecode, worker_pb2_grpc.DecodeWorkerServicer, worker_pb2_grpc.DecodeWorkerStub),
         ("PrefillWorker", FakePrefill, worker_pb2_grpc.PrefillWorkerServicer, worker_pb2_grpc.PrefillWorkerStub)]
_DEFAULT_ANSWER = "Method not implemented!"  # what the generated servicer says for an RPC nobody implemented


def _message(descriptor) -> type:
    """The generated class of a message type of ``dsv32.worker.v1``."""
    assert descriptor.file is worker_pb2.DESCRIPTOR, f"{descriptor.full_name} is not a worker.proto message"
    return getattr(worker_pb2, descriptor.name)


@pytest.mark.parametrize("service,fake,servicer,_stub", FAKES, ids=[f[0] for f in FAKES])
def test_fakes_implement_every_rpc_of_their_service_with_its_types(service, fake, servicer, _stub):
    desc = worker_pb2.DESCRIPTOR.services_by_name[service]
    assert issubclass(fake, servicer)
    for m in desc.methods:
        impl = getattr(fake, m.name)
        assert impl is not getattr(servicer, m.name), f"{fake.__name__}.{m.name} is missing (inherited default)"
        assert not m.client_streaming, f"{m.name}: the fakes handle no client streams"
        hints = typing.get_type_hints(impl)
        req_param = list(inspect.signature(impl).parameters)[1]
        assert hints.get(req_param) is _message(m.input_type), f"{fake.__name__}.{m.name} request type"
        ret = hints.get("return")
        assert inspect.isgeneratorfunction(impl) == m.server_streaming, f"{fake.__name__}.{m.name} streaming"
        if m.server_streaming:
            assert typing.get_origin(ret) is Iterator, f"{fake.__name__}.{m.name} must return Iterator[...]"
            ret = typing.get_args(ret)[0]
        assert ret is _message(m.output_type), f"{fake.__name__}.{m.name} response type"
    rpc_like = {n for n, v in vars(fake).items() if n[:1].isupper() and callable(v)}
    assert rpc_like <= {m.name for m in desc.methods}, f"{fake.__name__} serves RPCs the proto lacks"


@pytest.mark.parametrize("service,fake,_servicer,stub", FAKES, ids=[f[0] for f in FAKES])
def test_fakes_answer_every_rpc_through_grpc(service, fake, _servicer, stub):
    svc = fake("f0")
    srv, port = serve_fake(svc)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            client = stub(ch)
            for m in worker_pb2.DESCRIPTOR.services_by_name[service].methods:
                call = getattr(client, m.name)
                try:
                    out = call(_message(m.input_type)(), timeout=10)
                    for msg in (list(out) if m.server_streaming else [out]):
                        assert isinstance(msg, _message(m.output_type)), f"{m.name} answered {type(msg).__name__}"
                except grpc.RpcError as e:  # a deliberate refusal is fine; the default answer is drift
                    assert e.details() != _DEFAULT_ANSWER, f"{fake.__name__} does not implement {m.name}"
    finally:
        srv.stop(None)


def test_the_rpcs_the_router_calls_exist_on_the_worker_services():
    names = {m.name for m in worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].methods}
    assert {"Reserve", "Decode", "Cancel"} <= names
    assert "Prefill" in {m.name for m in worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].methods}
    assert serving_pb2_grpc.GenerationStub and os.path.exists(serving_pb2.__file__)


def test_a_corrupted_transfer_injected_on_the_fake_prefill_fails_the_next_decode():
    faults: deque = deque()
    svc = FakePrefill("p", faults)
    srv, port = serve_fake(svc)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            client = worker_pb2_grpc.PrefillWorkerStub(ch)
            client.InjectFault(worker_pb2.FaultRequest(kind="corrupt_next_transfer", count=2))
            assert list(faults) == ["data_loss", "data_loss"]
            client.InjectFault(worker_pb2.FaultRequest(kind="none"))
            assert not faults
            with pytest.raises(grpc.RpcError) as e:
                client.InjectFault(worker_pb2.FaultRequest(kind="meteor"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        srv.stop(None)
