"""KV transfer from a prefill worker to a decode worker, layer by layer, over torch.distributed.

Two roles, one per worker kind; these are all their primitives:

=========================  ====================================================
decode worker              ``KVReceiver(cache, host, port, worker_id)``
                           ``.endpoint`` — ``HOST:PORT`` of the TCPStore it hosts
                           ``.expect(transfer_id, peer_id, dst_pages)``
                           ``.poll(transfer_id)`` → ``KVPoll``
                           ``.wait(transfer_id, timeout_s)`` → ``TransferResult``
                           ``.release(transfer_id)``, ``.close()``
prefill worker             ``KVSender(cache, worker_id)``
                           ``.begin(transfer_id, endpoint, decode_id, src_pages)`` → ``SendHandle``
                           ``.send_layer(handle, layer)`` — right after the forward wrote the layer
                           ``.finish(handle, timeout_s)`` → ``TransferResult``
                           ``.poll(handle)`` → ``KVPoll``, ``.close()``
                           ``.arm_fault(kind, count=1)``, ``.disarm_fault()`` — tests
=========================  ====================================================

``base`` writes these down as ``KVReceiverProtocol`` and ``KVSenderProtocol``;
``fake`` (:mod:`.fake`) has the same two roles in one process, for unit tests
and warm-up. Every failure is a ``TransferError`` subclass with a stable
``reason`` (``errors``: ``ChecksumMismatch``, ``GeometryMismatch``,
``TransferTimeout``, ``PeerUnreachable``, ``PeerFailed``, ``TransferClosed``;
a ``wait`` or ``finish`` that runs out before the transfer ends raises
``StillInFlight``). Fault names for ``arm_fault`` are in ``faults.FAULTS``.

A transfer's life (``KVPoll``): BOOTSTRAPPING → WAITING → TRANSFERRING → SUCCESS, or FAILED at any point.

1. The decode worker reserves pages and calls ``expect``; the transfer waits
   for its announcement.
2. The prefill worker calls ``begin``; a sender thread connects to the decode
   worker's store, takes a fresh *generation* for the pair if it has no live
   group (``store.add`` on ``pair/{prefill}/{decode}/gen``), pushes the
   announcement (generation, sequence number on the pair, geometry) onto the
   store queue ``xfer/announce``, then builds the 2-rank group
   ``pair/{prefill}/{decode}/{gen}/`` (gloo on CPU, NCCL on CUDA) if needed.
   The receiver's bootstrap thread, blocked on that queue, hands the
   announcement to the expecting transfer (or keeps it until ``expect``) and
   joins a new generation's group at once. Groups are cached on both sides.
3. Each ``send_layer`` hands a layer to the sender thread. A transfer's bytes
   travel as the messages of ``pair.message_plan`` (the same on both sides,
   from the announced geometry), indexer pool first, then latent: a pool of a
   layer is one message, or several windows of ~8 MiB; pieces under 1 MiB (a
   short prompt's layer) are packed together, never across layers. A message
   whose pages are a run of consecutive ids is sent from the pool in place;
   others are gathered into a staging buffer, ~2 MiB at a time, each block
   hashed right after its copy (``pages.Checksum``: XXH3-128 on CPU, ~60 GB/s a
   core). An issuer thread sends them with tag ``(seq, message)``. The
   receiver keeps ~32 MiB of receives posted; a message that is one run of
   destination pages is received straight into them once an earlier message
   of its layer has landed (so ``release`` never waits on a layer still being
   computed) and hashed there; others land in staging buffers and are hashed
   and scattered block by block as they land, in order.
4. After its last message the sender sends its checksum as one more message;
   the receiver compares it with its own, so a corrupted or missing latent or
   indexer page fails the transfer instead of silently producing garbage
   (``ChecksumMismatch``). Both results also carry the checksum, which
   ``cache_checksum`` recomputes from a cache.

Concurrency: any number of transfers may be in flight on a pair and across
pairs. The sequence number, assigned by the sender under the pair's lock and
carried in the announcement, makes every tag unique among the pair's transfers
in flight, so a send can only match its own receive. NCCL ignores tags, so on
CUDA (``ordered``) each side issues a pair's transfers one after another in
sequence order instead.

Failure: every wait has a deadline (``timeout_s`` from ``expect``/the
announcement on the receiver, from ``begin`` on the sender). A gloo wait that
fails or times out closes the pair, so any failure after the group was used
marks that generation broken on the side that saw it; the sender takes a new
generation at its next ``begin`` (a restarted sender always does), the receiver
builds the newer group when it reads that announcement and never rebuilds a
generation it has already built. A sender that dies mid-transfer is seen by the
receiver as a closed connection, well within the timeout (``PeerFailed``; a
wait that runs into its deadline is a ``TransferTimeout``). Checksum or geometry
mismatches drain the data and fail the transfer but keep the group.
"""

from __future__ import annotations

from .base import KVReceiverProtocol, KVSenderProtocol, SendHandleProtocol
from .errors import (ChecksumMismatch, GeometryMismatch, PeerFailed, PeerUnreachable, StillInFlight, TransferClosed,
                     TransferError, TransferTimeout)
from .faults import FAULT_ENV, FAULTS
from .pages import cache_checksum
from .receiver import KVReceiver
from .sender import KVSender, SendHandle
from .state import KVPoll, TransferResult

__all__ = ["FAULTS", "FAULT_ENV", "ChecksumMismatch", "GeometryMismatch", "KVPoll", "KVReceiver", "KVReceiverProtocol",
           "KVSender", "KVSenderProtocol", "PeerFailed", "PeerUnreachable", "SendHandle", "SendHandleProtocol",
           "StillInFlight", "TransferClosed", "TransferError", "TransferResult", "TransferTimeout", "cache_checksum"]
