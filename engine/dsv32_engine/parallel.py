"""Expert parallelism: which rank holds which routed expert, and the group the ranks step in.

An EP group is N rank processes. Each rank holds the attention, the dense
layers, the shared experts, the embedding and the LM head (data-parallel
attention: its own requests, page pool and running batch) and its share of
the routed experts, given by an :class:`ExpertPlacement` (expert → rank). The
MoE layers exchange token copies with ``all_to_all`` (see :mod:`.moe`), so all
ranks must run the same number of forwards: :class:`EPGroup` is the lockstep.

Lockstep. Every engine step begins with :meth:`EPGroup.any_work` (an
``all_reduce`` MAX of "I have tokens this step"). When some rank has work,
ranks without any run an *idle forward* (the MoE collectives with zero tokens,
no attention), so nobody waits for a peer that never comes. When no rank has
work, every rank returns and its worker loop sleeps briefly before asking
again: no deadlock when one rank is idle, no busy spinning when all are.

Every collective has a timeout (the group's, ``EPConfig.timeout_s``). A peer
that died makes the next collective fail at once (the connection is gone); a
peer that hangs makes it fail after the timeout. Either way the error is
:class:`EPGroupFailed`, and a worker that sees it exits (its registration goes
with it) instead of hanging in a collective.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from .config import ConfigError


class EPGroupFailed(RuntimeError):
    """A collective of the expert-parallel group failed or timed out: the group is broken."""


@dataclass(frozen=True)
class ExpertPlacement:
    """Routed expert → owning rank, for ``num_experts`` experts over ``ep_size`` ranks.

    An explicit table, so that a load-balanced placement (EPLB) can replace the
    even split without touching the MoE code. Each expert has exactly one owner
    (redundant replicas would extend ``owner`` to a list per expert).
    """

    num_experts: int
    ep_size: int
    owner: tuple[int, ...]
    """``owner[e]`` = the rank that holds routed expert ``e``."""

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ConfigError(f"ep-size must be >= 1, got {self.ep_size}")
        if self.ep_size > self.num_experts:
            raise ConfigError(f"ep-size {self.ep_size} is above the model's {self.num_experts} routed experts")
        if len(self.owner) != self.num_experts:
            raise ConfigError(f"placement table names {len(self.owner)} experts, the model has {self.num_experts}")
        bad = sorted({r for r in self.owner if not 0 <= r < self.ep_size})
        if bad:
            raise ConfigError(f"placement table names rank(s) {bad} outside 0..{self.ep_size - 1}")
        empty = [r for r in range(self.ep_size) if r not in self.owner]
        if empty:
            raise ConfigError(f"placement table gives no expert to rank(s) {empty}")

    @classmethod
    def even(cls, num_experts: int, ep_size: int) -> "ExpertPlacement":
        """Contiguous equal shares: rank r holds experts [r·E/N, (r+1)·E/N)."""
        if ep_size < 1:
            raise ConfigError(f"ep-size must be >= 1, got {ep_size}")
        if ep_size > num_experts:
            raise ConfigError(f"ep-size {ep_size} is above the model's {num_experts} routed experts")
        if num_experts % ep_size:
            raise ConfigError(f"ep-size {ep_size} does not divide the model's {num_experts} routed experts")
        share = num_experts // ep_size
        return cls(num_experts, ep_size, tuple(e // share for e in range(num_experts)))

    @classmethod
    def from_table(cls, table: dict[int, list[int]] | dict[str, list[int]], num_experts: int) -> "ExpertPlacement":
        """From ``{rank: [experts...]}`` (JSON keys may be strings); every expert exactly once."""
        owner: dict[int, int] = {}
        ranks = sorted(int(r) for r in table)
        if ranks != list(range(len(ranks))):
            raise ConfigError(f"placement table ranks must be 0..N-1, got {ranks}")
        for r in ranks:
            for e in table[r] if r in table else table[str(r)]:
                e = int(e)
                if not 0 <= e < num_experts:
                    raise ConfigError(f"placement table names expert {e}, the model has experts 0..{num_experts - 1}")
                if e in owner:
                    raise ConfigError(f"placement table names expert {e} twice (ranks {owner[e]} and {r})")
                owner[e] = r
        missing = [e for e in range(num_experts) if e not in owner]
        if missing:
            raise ConfigError(f"placement table is missing expert(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        return cls(num_experts, len(ranks), tuple(owner[e] for e in range(num_experts)))

    def local_experts(self, rank: int) -> list[int]:
        """The global ids of the experts ``rank`` holds, in increasing order (its local ids 0, 1, ...)."""
        return [e for e, r in enumerate(self.owner) if r == rank]

    def tables(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``owner [E]`` and ``local_index [E]`` (an expert's position among its owner's experts)."""
        local = [0] * self.num_experts
        seen = [0] * self.ep_size
        for e, r in enumerate(self.owner):
            local[e], seen[r] = seen[r], seen[r] + 1
        return (torch.tensor(self.owner, dtype=torch.long, device=device),
                torch.tensor(local, dtype=torch.long, device=device))


@dataclass(frozen=True)
class EPConfig:
    """One rank's place in an expert-parallel group."""

    size: int = 1
    """Ranks in the group (``--ep-size``); 1 = no expert parallelism."""
    rank: int = 0
    """This process's rank, 0..size-1."""
    master: str = ""
    """``HOST:PORT`` of the TCPStore that rank 0 hosts for the group's rendezvous."""
    group_id: str = "ep"
    """Namespaces the rendezvous keys, so that groups sharing a store do not collide."""
    timeout_s: float = 30.0
    """Bound on every collective (and on the rendezvous)."""
    placement: dict | None = field(default=None, hash=False, compare=False)
    """Optional ``{rank: [experts]}`` table; default: the even split."""

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ConfigError(f"ep rank {self.rank} is outside an EP group of size {self.size}")
        if self.size > 1 and not self.master:
            raise ConfigError("an EP group of size > 1 needs the rendezvous address (--ep-master HOST:PORT)")
        if self.timeout_s <= 0:
            raise ConfigError(f"ep timeout must be > 0, got {self.timeout_s}")

    def make_placement(self, num_experts: int) -> ExpertPlacement:
        if self.placement is not None:
            p = ExpertPlacement.from_table(self.placement, num_experts)
            if p.ep_size != self.size:
                raise ConfigError(f"placement table has {p.ep_size} ranks, the EP group has {self.size}")
            return p
        return ExpertPlacement.even(num_experts, self.size)


class EPGroup:
    """The torch.distributed group of one EP rank (gloo on CPU, NCCL on CUDA), with the MoE's collectives.

    Also counts what crosses the wire (``bytes_sent``: payload bytes to other
    ranks; ``remote_rows``: pairs sent to another rank) and, when ``profile`` is
    on, the seconds spent in each MoE phase.
    """

    def __init__(self, cfg: EPConfig, device: torch.device):
        import torch.distributed as dist

        self.cfg, self.rank, self.size, self.device = cfg, cfg.rank, cfg.size, device
        self.timeout = timedelta(seconds=cfg.timeout_s)
        host, port = cfg.master.rsplit(":", 1)
        store = dist.TCPStore(host.strip("[]"), int(port), cfg.size, is_master=cfg.rank == 0,
                              timeout=self.timeout, wait_for_workers=False)
        store = dist.PrefixStore(f"{cfg.group_id}/", store)
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            if self.backend == "nccl":
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = self.timeout  # the watchdog aborts a collective stuck past it
                self.pg = dist.ProcessGroupNCCL(store, cfg.rank, cfg.size, opts)
            else:
                self.pg = dist.ProcessGroupGloo(store, cfg.rank, cfg.size, self.timeout)
        except Exception as exc:  # noqa: BLE001 — rendezvous failures come in many types
            raise EPGroupFailed(f"EP rank {cfg.rank}/{cfg.size}: cannot join the group at {cfg.master}: {exc}") from exc
        self._store = store
        self.bytes_sent = 0
        self.remote_rows = 0
        """(token, expert) pairs dispatched to another rank: each must cross twice, the minimum traffic."""
        self.profile = False
        self.seconds = {"dispatch": 0.0, "experts": 0.0, "combine": 0.0}

    # -- collectives (each bounded by the group timeout) --------------------------------------
    def _wait(self, work, what: str) -> None:
        try:
            if not work.wait(self.timeout):
                raise EPGroupFailed(f"EP {what} timed out after {self.cfg.timeout_s:.0f}s")
        except EPGroupFailed:
            raise
        except Exception as exc:  # noqa: BLE001 — gloo/NCCL raise RuntimeError and subclasses
            raise EPGroupFailed(f"EP {what} failed on rank {self.rank}: {exc}") from exc

    def any_work(self, mine: bool) -> bool:
        """Lockstep: True when some rank of the group has tokens to run this step."""
        import torch.distributed as dist

        flag = torch.tensor([1 if mine else 0], dtype=torch.int32, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self._wait(self.pg.allreduce([flag], opts), "step agreement")
        return bool(flag.item())

    def all_to_all(self, inp: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        """Rows ``inp[sum(in_splits[:r]) : ...]`` go to rank r; rows from rank r land at ``out_splits`` offsets."""
        import torch.distributed as dist

        out = inp.new_empty((sum(out_splits), *inp.shape[1:]))
        row = math.prod(inp.shape[1:]) * inp.element_size()
        self.bytes_sent += (sum(in_splits) - in_splits[self.rank]) * row
        self._wait(self.pg.alltoall_base(out, inp.contiguous(), list(out_splits), list(in_splits),
                                         dist.AllToAllOptions()), "all_to_all")
        return out

    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """``send_counts[r]`` rows go to rank r → ``recv[r]`` rows come from rank r."""
        return self.all_to_all(send_counts.to(torch.int64), [1] * self.size, [1] * self.size)

    def timed(self, phase: str, t0: float) -> float:
        if self.profile:
            now = time.perf_counter()
            self.seconds[phase] += now - t0
            return now
        return t0

    def close(self) -> None:
        self.pg = None
