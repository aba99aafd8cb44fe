"""dsv32_prefill: the prefill worker.

A request's life here, as a sequence of queues:

1. **WaitingQueue** (``Prefill`` RPC). The router sends the prompt, the
   resolved sampling parameters and where the KV must go (decode worker id,
   its receiver endpoint, the transfer id it expects). The queue is bounded in
   tokens: beyond ``--max-queued-tokens`` the RPC answers
   ``RESOURCE_EXHAUSTED`` (back-pressure to the router). A cancelled RPC
   leaves the queue before it costs anything.
2. **Step** (the loop thread). Each step fills the token budget
   (``--max-num-batched-tokens``) with chunks: a prompt longer than what is
   left runs in chunks over several steps (a *partial* prompt, its pages held
   from its first chunk), and a prompt that arrives behind a long one gets a
   step of its own after the chunk in progress (the rules:
   :class:`~dsv32_prefill.scheduler.PrefillScheduler`). A prompt gets pages
   from this worker's own pool at its first chunk, and at its last chunk a KV
   sender handle towards its decode worker (``KVSender.begin``: the pair group
   is found or built). A cancelled partial prompt is dropped between chunks.
3. **Forward + push**. ``EngineCore.prefill`` runs the step; after each
   layer's cache writes it calls back, and the pages of that layer of every
   prompt whose chunk is its last are handed to the sender (the earlier
   chunks' cache is complete by then), so the transfer of layer *l* overlaps
   the compute of layer *l+1*. The engine samples each such prompt's first
   token.
4. **PrefillInflightQueue** (:mod:`dsv32_prefill.inflight`). The batch loop
   hands each request, with its pages and its sender handle, to this queue and
   starts the next step at once: the transfer's tail (the sends still queued
   after the last layer) overlaps the next forward. The queue's thread polls
   the sender (``KVSender.poll``); a transfer that ends gives its pages back to
   the pool and answers the RPC: the first token, the checksum over everything
   sent and the counters (queue time, compute time, wait after the last
   layer). Every transfer ends within ``--transfer-timeout`` of joining the
   queue. A failed transfer fails only its own request (``UNAVAILABLE``): the
   router retries it on another pair. A prompt that needs pages still held
   here waits in the WaitingQueue until they come back.
"""
