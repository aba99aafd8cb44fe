"""The two roles of KV transfer as protocols: what the workers may call, whatever the backend.

``KVSender``/``KVReceiver`` (torch.distributed) and ``FakeKVSender``/``FakeKVReceiver``
(in-process copies) both satisfy them; ``tests/test_transfer_conformance.py`` drives
the same scenarios through both. The package docstring tells a transfer's life.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

from .state import KVPoll, TransferResult


@runtime_checkable
class SendHandleProtocol(Protocol):
    """One transfer on the sender side, as ``begin`` returns it."""

    transfer_id: str
    num_layers: int


H = TypeVar("H", bound=SendHandleProtocol)


@runtime_checkable
class KVSenderProtocol(Protocol[H]):
    """Prefill-worker side: ``begin`` → ``send_layer`` × layers → ``finish``; ``poll`` any time.

    Errors are ``TransferError`` subclasses (``errors``); ``finish`` raises the one the transfer failed with.
    """

    worker_id: str

    def begin(self, transfer_id: str, endpoint: str, decode_id: str, src_pages: list[int],
              num_layers: int | None = None, token: str = "") -> H:
        """Start sending ``src_pages`` of every layer (or the first ``num_layers``) to the receiver at
        ``endpoint``, which is decode worker ``decode_id``. Non-blocking. ``token``: the transfer's secret
        as the receiver issued it (the announcement carries a proof of it, never the token)."""
        ...

    def send_layer(self, handle: H, layer: int) -> None:
        """Layer ``layer`` of the source pages is final (layers in order from 0). Non-blocking."""
        ...

    def finish(self, handle: H, timeout_s: float) -> TransferResult:
        """Block until every layer is sent; ``StillInFlight`` if ``timeout_s`` runs out first."""
        ...

    def poll(self, handle: H) -> KVPoll: ...

    def arm_fault(self, kind: str, count: int = 1) -> None:
        """Test hook: hit the next ``count`` transfers with ``kind`` (``faults.FAULTS``; else ``ValueError``)."""
        ...

    def disarm_fault(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class KVReceiverProtocol(Protocol):
    """Decode-worker side: ``expect`` → ``poll``/``wait`` → ``release``. Transfers are kept until ``release``."""

    worker_id: str

    @property
    def endpoint(self) -> str:
        """What senders are given to reach this receiver (``HOST:PORT``)."""
        ...

    def expect(self, transfer_id: str, peer_id: str, dst_pages: list[int], num_layers: int | None = None,
               token: str = "") -> None:
        """Receive ``transfer_id`` from prefill worker ``peer_id`` into ``dst_pages`` (background).
        ``token``: if given, only a sender that proves it knows it is received."""
        ...

    def poll(self, transfer_id: str) -> KVPoll:
        """``KeyError`` if the transfer is not expected (or was released)."""
        ...

    def wait(self, transfer_id: str, timeout_s: float) -> TransferResult:
        """Block until the pages have landed and the checksum matched; raise the ``TransferError`` the
        transfer failed with, or ``StillInFlight`` if ``timeout_s`` runs out first."""
        ...

    def release(self, transfer_id: str) -> None:
        """Forget the transfer; from the return on, nothing writes to its pages."""
        ...

    def progress_at(self, transfer_id: str) -> float | None:
        """``time.monotonic()`` of the transfer's last progress; None before any (or if unknown). The decode
        worker renews a reservation's lease from it."""
        ...

    @property
    def healthy(self) -> bool:
        """False once a thread the receiver cannot work without has died."""
        ...

    def close(self) -> None: ...
