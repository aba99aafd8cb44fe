"""The wire protocol of KV transfer: store keys, announcements, tags, pair groups.

All keys live on the decode worker's TCPStore:

* ``pair/{prefill}/{decode}/gen`` — counter; a sender takes a fresh generation
  (``store.add``) each time it (re)builds its group to that decode worker.
* ``pair/{prefill}/{decode}/{gen}/...`` — the 2-rank group's own rendezvous
  (sender rank 0, receiver rank 1). A prefix is used once: a broken group is
  never rebuilt under the same generation (stale rendezvous keys would point at
  dead sockets).
* ``xfer/announce`` — a store queue of announcements, one per transfer
  (generation, sequence number, geometry), pushed by senders before their
  first send and popped by the receiver's bootstrap thread.

A transfer's bytes travel on the pair group as the messages of ``message_plan``,
tagged ``(seq, message)``, followed by one more: the sender's checksum
(``DIGEST_BYTES``), which the receiver compares with its own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import PeerFailed, PeerUnreachable, TransferError, TransferTimeout

SENDER_RANK, RECEIVER_RANK = 0, 1
MESSAGE_BITS = 16  # < 65536 messages a transfer (see message_plan)
SEQ_BITS = 31 - MESSAGE_BITS  # gloo tags are C ints
SEQ_MOD = 1 << SEQ_BITS  # sequence numbers wrap after 32768 transfers on a pair (far more than can be in flight)
MAX_WINDOWS = 128  # messages one pool of one layer is cut into, at most
MIN_MESSAGE_BYTES = 4 << 20
"""Pieces smaller than this are packed together with the next ones of their layer. A message has a fixed
cost (gloo: ~0.1-0.2 ms here, and a receive posted into the pages is posted late, so the sender waits for
it), about what copying a few MB costs; measured on the 2 shared cores, 4 MiB was the better cut."""
ANNOUNCE_QUEUE = "xfer/announce"


def tag(seq: int, message: int) -> int:
    """The gloo tag of one message: distinct for every (transfer in flight on the pair, message)."""
    if not 0 <= message < (1 << MESSAGE_BITS):
        raise ValueError(f"message {message} out of the tag range")
    return ((seq % SEQ_MOD) << MESSAGE_BITS) | message


@dataclass(frozen=True)
class Segment:
    """Pages ``[a, b)`` of the transfer's page list, of pool ``part`` (``CachePages.parts``) of ``layer``."""

    layer: int
    part: int
    a: int
    b: int
    page_bytes: int

    @property
    def nbytes(self) -> int:
        return (self.b - self.a) * self.page_bytes


@dataclass(frozen=True)
class Message:
    """One send/recv: its segments back to back, in wire (and checksum) order."""

    segments: tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    @property
    def last_layer(self) -> int:
        return self.segments[-1].layer


def message_plan(num_layers: int, num_pages: int, part_bytes: list[int], chunk_pages: int) -> list[Message]:
    """The messages of a transfer, the same on both sides (everything here is in the announcement).

    Each pool of each layer is cut into windows of at most ``chunk_pages`` latent pages' worth of bytes; a
    window of at least ``MIN_MESSAGE_BYTES`` is a message of its own (sent from / received into the pages
    in place where they are a run), smaller ones are packed with the small pieces that follow until the
    message reaches ``MIN_MESSAGE_BYTES``. A message never spans layers: each layer leaves as soon as
    ``send_layer`` hands it over (and the receiver sees progress a layer at a time). So a short prompt sends
    one message a layer (indexer and latent pages packed), a long one a message a pool a layer (or a window).
    """
    chunk_bytes = chunk_pages * max(part_bytes)
    pieces = []
    for layer in range(num_layers):
        for part, page_bytes in enumerate(part_bytes):
            per = max(1, chunk_bytes // page_bytes, -(-num_pages // MAX_WINDOWS))
            n = max(1, -(-num_pages // per))  # balanced windows: no small tail message
            bounds = [num_pages * i // n for i in range(n + 1)]
            pieces += [Segment(layer, part, a, b, page_bytes) for a, b in zip(bounds, bounds[1:]) if b > a]
    messages, pending = [], []
    for piece in pieces:
        if pending and (piece.nbytes >= MIN_MESSAGE_BYTES or piece.layer != pending[0].layer):
            messages.append(Message(tuple(pending)))
            pending = []
        if piece.nbytes >= MIN_MESSAGE_BYTES:  # on its own: it may be sent and received in place
            messages.append(Message((piece,)))
            continue
        pending.append(piece)
        if sum(p.nbytes for p in pending) >= MIN_MESSAGE_BYTES:
            messages.append(Message(tuple(pending)))
            pending = []
    if pending:
        messages.append(Message(tuple(pending)))
    if len(messages) >= 1 << MESSAGE_BITS:  # (the checksum message comes after them)
        raise ValueError(f"{len(messages)} messages: more than the tag range (raise chunk_pages)")
    return messages


def pages_per_chunk(page_bytes: int, chunk_bytes: int) -> int:
    """Pages of ``page_bytes`` in about ``chunk_bytes`` (the announced message size, in latent pages)."""
    return max(1, chunk_bytes // max(page_bytes, 1))


def gen_key(prefill_id: str, decode_id: str) -> str:
    return f"pair/{prefill_id}/{decode_id}/gen"


def group_prefix(prefill_id: str, decode_id: str, gen: int) -> str:
    return f"pair/{prefill_id}/{decode_id}/{gen}/"


DIGEST_BYTES = 64
"""The last message of a transfer: the sender's checksum (``Checksum.hexdigest``), ASCII, zero-padded."""


def encode_digest(hexdigest: str, device: torch.device) -> torch.Tensor:
    raw = hexdigest.encode().ljust(DIGEST_BYTES, b"\0")
    if len(raw) != DIGEST_BYTES:
        raise ValueError(f"checksum {hexdigest!r} is longer than {DIGEST_BYTES} bytes")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)


def decode_digest(buf: torch.Tensor) -> str:
    return bytes(buf.cpu().numpy()).rstrip(b"\0").decode("ascii", "replace")


@dataclass(frozen=True)
class Announcement:
    """What a sender tells the receiver about one transfer before its first send."""

    transfer_id: str
    prefill_id: str
    gen: int
    seq: int
    num_layers: int
    num_pages: int
    latent_page_bytes: int
    index_page_bytes: int
    backend: str
    ordered: bool
    chunk_pages: int
    proof: str = ""
    """HMAC-SHA256 of the fields above under the transfer's token (which the decode worker issued and only
    the router and this sender know); empty without a token."""

    @property
    def part_bytes(self) -> list[int]:
        """Page bytes of each pool that travels, in wire order (as ``CachePages.part_bytes``)."""
        return [self.index_page_bytes, self.latent_page_bytes] if self.index_page_bytes else [self.latent_page_bytes]

    def signed(self, token: str) -> Announcement:
        return replace(self, proof=self.expected_proof(token)) if token else self

    def expected_proof(self, token: str) -> str:
        fields_ = asdict(self)
        fields_.pop("proof")
        return hmac.new(token.encode(), json.dumps(fields_, sort_keys=True).encode(), hashlib.sha256).hexdigest()

    def proves(self, token: str) -> bool:
        """True if made by a sender that knows ``token`` (always, without a token)."""
        return not token or hmac.compare_digest(self.proof, self.expected_proof(token))

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> Announcement:
        """Parse and check one queue entry; ``ValueError`` for anything that is not a well-formed announcement
        (the queue is writable by whoever reaches the store)."""
        if len(raw) > 4096:
            raise ValueError(f"announcement of {len(raw)} bytes")
        d = json.loads(raw)
        types = {f.name: f.type for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != set(types):
            raise ValueError("announcement fields do not match")
        for k, v in d.items():
            want = {"str": str, "int": int, "bool": bool}[types[k]]
            if type(v) is not want or (want is int and not 0 <= v < 1 << 31):
                raise ValueError(f"announcement field {k}: {v!r}")
        return cls(**d)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"endpoint must be HOST:PORT, got {endpoint!r}")
    return host.strip("[]"), int(port)


def local_address_towards(host: str, port: int) -> str:
    """The local IP this machine uses to reach ``host`` (gloo must bind to a routable address)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP: no packet is sent
        return s.getsockname()[0]


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` only (TCPStore itself would listen on every interface)."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "::" if host in ("::", "[::]") else "0.0.0.0"
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(512)
    return sock


def host_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """The receiver's store, listening on ``host`` only (the store owns the socket from then on)."""
    sock = listen_socket(host, port)
    try:
        store = dist.TCPStore(host or "0.0.0.0", sock.getsockname()[1], None, is_master=True,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                              master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()
    return store


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    try:
        return dist.TCPStore(host, port, None, is_master=False, timeout=timedelta(seconds=max(timeout_s, 0.1)),
                             wait_for_workers=False)
    except Exception as e:  # DistNetworkError and friends
        raise PeerUnreachable(f"cannot reach the transfer store at {host}:{port}: {e}") from e


def build_group(backend: str, host: str, port: int, prefix: str, rank: int, timeout_s: float, local_host: str):
    """Join one 2-rank pair group; blocks until the peer joins too (at most ``timeout_s``).

    Each group gets its own store connection: gloo's rendezvous blocks on it,
    and the receiver's shared store must stay free for announcements meanwhile.
    Returns ``(group, store)``; keep the store alive as long as the group.
    """
    store = connect_store(host, port, timeout_s)
    prefixed = dist.PrefixStore(prefix, store)
    timeout = timedelta(seconds=max(timeout_s, 0.1))
    try:
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
            return dist.ProcessGroupGloo(prefixed, rank, 2, opts), store
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None:
            raise TransferError("KV cache is on CUDA but this torch build has no NCCL")
        opts = nccl.Options()
        opts._timeout = timeout
        return nccl(prefixed, rank, 2, opts), store
    except TransferError:
        raise
    except Exception as e:
        raise PeerUnreachable(f"pair group {prefix} ({backend}, rank {rank}) not formed: {e}") from e


def seconds_left(deadline: float) -> float:
    """Seconds until a ``time.monotonic()`` deadline; at least 1 ms (gloo reads 0 as 'the group default')."""
    return max(deadline - time.monotonic(), 0.001)


def wait_work(work, deadline: float) -> None:
    """Wait for a send/recv. A gloo wait that times out also closes the pair: the group is dead after it."""
    try:
        done = work.wait(timedelta(seconds=seconds_left(deadline)))
    except Exception as e:
        raise peer_error(e, deadline) from e
    if done is False:
        raise TransferTimeout("a send or receive did not complete in time")


def peer_error(e: Exception, deadline: float) -> TransferError:
    """What a failed send, receive or wait on the pair group means: at the deadline, a timeout; before it,
    the peer went away (gloo says which only in its message)."""
    if isinstance(e, TransferError):
        return e
    # The backends round timeouts down to milliseconds: a timed-out wait may end a little before the deadline.
    late = time.monotonic() >= deadline - 0.05
    return (TransferTimeout if late else PeerFailed)(f"{type(e).__name__}: {e}")


@dataclass(eq=False)
class PairGroup:
    """One generation of the 2-rank group of a (prefill, decode) pair, as either side holds it."""

    pg: object
    store: object
    """The group's own store connection (its rendezvous); guarded by ``store_lock``."""
    gen: int
    ordered: bool
    """True where the backend matches sends to receives by order, not tag (NCCL)."""
    next_seq: int = 0  # sender: the sequence number of the next announced transfer
    broken: bool = False
    turn: int = 0  # ordered mode: the sequence number allowed to issue its sends (receives) now
    cv: threading.Condition = field(default_factory=threading.Condition)
    store_lock: threading.Lock = field(default_factory=threading.Lock)

    def take_turn(self, seq: int, deadline: float) -> None:
        """Ordered mode: wait until every earlier transfer on the pair has issued all its operations."""
        with self.cv:
            if not self.cv.wait_for(lambda: self.turn == seq or self.broken, seconds_left(deadline)):
                raise TransferTimeout(f"transfer #{seq} waited too long for its turn on the pair")
            if self.broken:
                raise PeerFailed("pair group broke while waiting for a turn")

    def pass_turn(self, seq: int) -> None:
        with self.cv:
            self.turn = seq + 1
            self.cv.notify_all()

    def mark_broken(self) -> None:
        with self.cv:
            self.broken = True
            self.cv.notify_all()
