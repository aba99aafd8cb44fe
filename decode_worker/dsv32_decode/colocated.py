"""``dsv32-serve colocated``: a worker that runs prefill and decode in one process.

The baseline that disaggregation is measured against (``dsv32-serve up
--colocated``): the same engine, the same router and public API, the same
``DecodeWorker`` service and queues as a decode worker, registered in Redis
with the role ``colocated``. What differs is where the prompt runs:

1. **PreallocQueue** (``Reserve``). Capacity for prompt + max_tokens is
   committed, as on a decode worker, but no page is taken and no transfer is
   expected: the engine allocates the pages itself as it prefills, within the
   commitment (so a running request is still never preempted).
2. **RunningBatch** (``Decode`` stream, sent without a ``first`` token). The
   prompt is admitted with ``EngineCore.add_request``; each engine step packs
   one token for every decoding request and then prompt chunks up to
   ``--max-num-batched-tokens`` (chunked prefill mixed into decode batches),
   so a long prompt arriving slows every stream on this worker for the steps
   its chunks take. The first message on the stream is the first sampled
   token; later ones carry each step's tokens.
3. **Leave**: finish, cancel, deadline, disconnect or an engine error, as on a
   decode worker: the engine frees the pages, the commitment is returned.
"""

from __future__ import annotations

import argparse

import grpc

from .queues import Admission
from .worker import DecodeService, serve
from dsv32_cluster.runtime import add_worker_arguments, engine_params, start_worker


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_worker_arguments(p)


class ColocatedService(DecodeService):
    role = "colocated"
    receives_kv = False

    def __init__(self, worker_id: str, engine):
        super().__init__(worker_id, engine, receiver=None, transfer_timeout_s=0.0)

    def _admission(self, request, res, context) -> Admission:
        """The prompt itself goes straight to the running batch; no KV to wait for, no first message to echo."""
        if request.HasField("first"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"first: colocated worker {self.worker_id} runs the "
                          "prompt and samples the first token itself")
        adm = Admission(request.request_id, list(request.prompt_ids), engine_params(request.sampling),
                        page_ids=None, first=None)
        self.batch.admit(adm)
        return adm


def run(args: argparse.Namespace) -> int:
    engine = start_worker("colocated", args)  # --ep-size N: this process is rank 0 and starts the others
    svc = ColocatedService(args.worker_id, engine)
    svc.sessions.ttl_s = args.session_ttl
    return serve(args, svc)
