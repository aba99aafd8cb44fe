"""What a KV transfer fails with: ``TransferError`` and one subclass per kind of failure.

Callers tell failures apart by class (``except ChecksumMismatch``) or, where an
error has to cross a process boundary as text (a gRPC status, a log line, a
metric label), by its ``reason``: a short name that never changes, unlike the
message.

==================  ===============  ============================================================
class               ``reason``       raised when
==================  ===============  ============================================================
TransferError       ``error``        anything else (misuse, a backend that does not match)
ChecksumMismatch    ``checksum``     the pages that landed are not the ones sent
GeometryMismatch    ``geometry``     layers / pages / page sizes differ between the sides
TransferTimeout     ``timeout``      the transfer ran past its own deadline
PeerUnreachable     ``unreachable``  the peer's store cannot be reached or the group not formed
PeerFailed          ``peer_failed``  the pair group failed under the transfer (the peer died)
TransferClosed      ``closed``       the sender or receiver was closed, or the transfer released
StillInFlight       ``in_flight``    ``wait``/``finish`` ran out first; the transfer goes on
==================  ===============  ============================================================

The two mismatches drain the data and keep the pair group; the peer failures
and timeouts of a wait on the group break it (see the package docstring).
"""

from __future__ import annotations


class TransferError(RuntimeError):
    """A transfer failed, or a wait on it ran out of time."""

    reason = "error"


class ChecksumMismatch(TransferError):
    """The receiver's checksum over what landed differs from the sender's: latent or indexer pages were
    corrupted or went missing on the way."""

    reason = "checksum"


class GeometryMismatch(TransferError):
    """The sender announced other layers, page counts or page sizes than the receiver expects."""

    reason = "geometry"


class TransferTimeout(TransferError):
    """The transfer ran past its deadline: no announcement, a layer not handed over, or a send or receive
    that did not complete in time."""

    reason = "timeout"


class PeerUnreachable(TransferError):
    """The decode worker's transfer store could not be reached, or the pair group was not formed."""

    reason = "unreachable"


class PeerFailed(TransferError):
    """The pair group failed under the transfer before its deadline: the peer closed the connection
    (it died) or the group was found broken."""

    reason = "peer_failed"


class TransferClosed(TransferError):
    """The sender or receiver was closed, or the transfer released, before the transfer ended."""

    reason = "closed"


class StillInFlight(TransferError):
    """A ``wait`` or ``finish`` ran out of time before the transfer ended; the transfer goes on (poll it)."""

    reason = "in_flight"


def transfer_error(e: BaseException) -> TransferError:
    """``e`` as the error a transfer records: the same class and message, without traceback or chain.

    A recorded error outlives the thread that raised it, and a traceback would keep that thread's frames,
    and with them the pair group, alive (see ``state.TransferThreads``). Other exceptions become a plain
    ``TransferError`` naming their type.
    """
    if isinstance(e, TransferError):
        return type(e)(*e.args)
    return TransferError(f"{type(e).__name__}: {e}")
