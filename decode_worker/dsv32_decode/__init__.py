"""dsv32_decode: the decode worker (one process = one expert-parallel group, size 1 for now).

A request's life here, as a sequence of queues:

1. **PreallocQueue** (``Reserve``). The router asks for room. The worker
   commits capacity for prompt + max_tokens (so a running request is never
   preempted, which would recompute its prompt here), takes the prompt's pages
   from the engine's pool, tells its KV receiver to expect a transfer into
   them from the chosen prefill worker, and answers with the receiver's
   endpoint, the transfer id and the page ids. The reservation has a lease:
   if no ``Decode`` stream claims it in time (router died, prefill failed),
   the pages go back to the pool.
2. **DecodeTransferQueue** (``Decode`` stream opens;
   :mod:`dsv32_decode.transfer_queue`). The stream claims the reservation and
   hands the request to this queue; one thread polls the KV receiver
   (``KVReceiver.poll``) for every request in it, each bounded by
   ``--transfer-timeout``. The stream's own thread touches neither the
   receiver nor the engine: it forwards what its request's output queue
   receives (the transfer's outcome, then tokens).
3. **Verification** (in the transfer queue, as the transfer ends). The
   receiver's checksum over every latent and indexer page that arrived (and
   the byte count) must equal what the prefill worker reports having sent. A
   mismatch frees the pages and answers ``DATA_LOSS``; the router retries on
   another pair. A DSA model run on a missing indexer cache would produce
   garbage silently; this is where it is caught. A failed or late transfer
   frees the pages and answers ``UNAVAILABLE``.
4. **RunningBatch**. The transfer queue admits the verified request with
   ``EngineCore.add_prefilled`` (the pages become the engine's) and the loop
   thread steps the continuous batch; the first message on the stream echoes
   the prefill worker's first token, later messages carry each step's tokens.
5. **Leave**. Finish (EOS, stop token, max_tokens), client cancel, deadline,
   router disconnect (all of which end the stream) or an engine error: the
   request is aborted or finished in the engine, which frees its pages, and
   its capacity commitment is returned. ``Cancel`` does the same for a request
   that has no stream yet.

The colocated worker (:mod:`dsv32_decode.colocated`, the baseline of
``dsv32-serve up --colocated``) is this worker without steps 2-3: it commits
capacity without taking pages and runs the prompt itself in its running batch.
"""
