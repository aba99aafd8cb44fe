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
* ``xfer/{transfer_id}/sum`` — the sender's checksum, set before its last send;
  the receiver compares and deletes it.
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
LAYER_BITS, CHUNK_BITS = 8, 8  # < 256 layers (DeepSeek-V3.2: 61, +1 MTP), < 256 chunks a pool a layer
SEQ_BITS = 31 - LAYER_BITS - 1 - CHUNK_BITS  # gloo tags are C ints
SEQ_MOD = 1 << SEQ_BITS  # sequence numbers wrap after 16384 transfers on a pair (far more than can be in flight)
MAX_CHUNKS = 1 << CHUNK_BITS
ANNOUNCE_QUEUE = "xfer/announce"


def tag(seq: int, layer: int, part: int, chunk: int = 0) -> int:
    """The gloo tag of one message: distinct for every (transfer in flight on the pair, layer, pool, chunk)."""
    if not (0 <= layer < (1 << LAYER_BITS) and part in (0, 1) and 0 <= chunk < MAX_CHUNKS):
        raise ValueError(f"layer {layer} / part {part} / chunk {chunk} out of the tag range")
    return (((((seq % SEQ_MOD) << LAYER_BITS) | layer) << 1 | part) << CHUNK_BITS) | chunk


def chunk_ranges(num_pages: int, chunk_pages: int) -> list[tuple[int, int]]:
    """Page ranges ``[a, b)`` of the messages one pool of one layer is cut into."""
    return [(a, min(a + chunk_pages, num_pages)) for a in range(0, num_pages, chunk_pages)]


def pages_per_chunk(num_pages: int, page_bytes: int, chunk_bytes: int) -> int:
    """Pages a message: about ``chunk_bytes`` (so that checksum and copies run on cache-hot data)."""
    return max(1, chunk_bytes // max(page_bytes, 1), -(-num_pages // MAX_CHUNKS))


def gen_key(prefill_id: str, decode_id: str) -> str:
    return f"pair/{prefill_id}/{decode_id}/gen"


def group_prefix(prefill_id: str, decode_id: str, gen: int) -> str:
    return f"pair/{prefill_id}/{decode_id}/{gen}/"


def checksum_key(transfer_id: str) -> str:
    return f"xfer/{transfer_id}/sum"


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
    """The group's own store connection (rendezvous, then checksums); guarded by ``store_lock``."""
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
