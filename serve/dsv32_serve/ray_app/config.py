"""The Ray application's configuration (one :class:`RoleConfig` per role inside an
:class:`AppConfig`) and its autoscaling policy, :class:`LoadPolicy`.

An :class:`AppConfig` arrives in three shapes: built in Python; as its dict form
(``to_dict``, nested dicts for the roles: what ``serve deploy`` config files
give as ``args``); or as ``serve run ... key=value`` strings, where a role's
field is ``prefill.max_replicas=4`` and values are JSON (``router_port=0``,
``env={"OMP_NUM_THREADS": "1"}``) or, for a list, a shell-quoted command line
(``decode.args="--num-pages 64"``). :meth:`AppConfig.from_dict` takes all of
them and refuses unknown keys.
"""

from __future__ import annotations

import json
import math
import shlex
import typing
from dataclasses import asdict, dataclass, field, fields

ROLES = ("router", "prefill", "decode")
LOAD_METRIC = "dsv32_load"
DEFAULT_TARGET_LOAD = {"router": 128.0, "prefill": 8192.0, "decode": 48.0}
"""Per replica: router in-flight + waiting requests; prefill queued tokens; decode running + reserved requests."""


@dataclass
class RoleConfig:
    """One role's deployment."""

    min_replicas: int = 1
    """At least 1: with no replica of a role the cluster serves nothing, and reports no load to scale up on."""
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_load: float = 0.0
    """Load per replica the autoscaler aims at (see ``DEFAULT_TARGET_LOAD``); 0 = the role's default."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    args: list[str] = field(default_factory=list)
    """Extra flags of ``dsv32-serve ROLE``, e.g. ``["--max-num-seqs", "32"]``."""
    ep_size: int = 1
    """Prefill and decode: one replica = one expert-parallel group of this many rank processes
    (``--ep-size``), each rank registered as its own target; give the replica ``num_gpus`` for all
    of its ranks (one GPU each)."""
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")
        if self.target_load < 0 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("target_load, num_cpus and num_gpus must be >= 0")
        self.args = [str(a) for a in self.args]


@dataclass
class AppConfig:
    """The application: where the model and Redis are, how processes bind and advertise, each role."""

    model: str
    """Checkpoint directory, at this path on every node."""
    redis_url: str
    """Reachable from every node (a Redis on 127.0.0.1 only serves a one-node cluster)."""
    redis_prefix: str = "dsv32:"
    numerics: str = "exact"
    host: str = "0.0.0.0"
    """Bind address of every process."""
    advertise_host: str = ""
    """What workers register and the router reports; "" = ``host`` unless a wildcard, else the Ray node's IP."""
    router_port: int = 50051
    """The router's gRPC port; with a fixed port, at most one router replica per node. 0 = any free port."""
    ready_timeout_s: float = 300.0
    stop_grace_s: float = 10.0
    log_dir: str = ""
    """Where the children's logs go, on each node ("" = a temporary directory per replica)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the children (``DSV32_*`` tuning, ``OMP_NUM_THREADS``...)."""
    router: RoleConfig = field(default_factory=RoleConfig)
    prefill: RoleConfig = field(default_factory=RoleConfig)
    decode: RoleConfig = field(default_factory=RoleConfig)

    def __post_init__(self) -> None:
        if not self.model or not self.redis_url:
            raise ValueError("model and redis_url are required")
        if self.numerics not in ("exact", "fp8"):
            raise ValueError(f"numerics must be exact or fp8, got {self.numerics!r}")
        for role in ROLES:
            value = getattr(self, role)
            if isinstance(value, dict):
                setattr(self, role, _strict(RoleConfig, value, role))

    @classmethod
    def from_dict(cls, d: dict) -> AppConfig:
        """The dict form, nested or with ``role.field`` keys; string values of other fields are parsed."""
        nested: dict = {}
        for key, value in d.items():
            role, dot, name = key.partition(".")
            if dot:
                if role not in ROLES:
                    raise TypeError(f"config: unknown key {key}")
                nested.setdefault(role, {})
                if not isinstance(nested[role], dict):
                    raise TypeError(f"config: both {role} and {key} given")
                nested[role][name] = value
            elif key in nested:
                raise TypeError(f"config: both {key} and {key}.* given")
            else:
                nested[key] = value
        return _strict(cls, nested, "config")

    def to_dict(self) -> dict:
        return asdict(self)

    def target_load(self, role: str) -> float:
        return getattr(self, role).target_load or DEFAULT_TARGET_LOAD[role]


def _strict(cls, d: dict, where: str):
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise TypeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _parse(v, hints[k], f"{where}.{k}") for k, v in d.items()})


def _parse(value, hint, where: str):
    """A ``serve run`` string turned into the field's type; anything else as given."""
    if not isinstance(value, str) or hint is str:
        return value
    if typing.get_origin(hint) is list and not value.lstrip().startswith("["):
        return shlex.split(value)
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(f"{where}: cannot read {value!r} (give JSON: a number, a list, an object)") from None


# -- autoscaling ---------------------------------------------------------------------------

class LoadPolicy:
    """Serve autoscaling policy: replicas = ceil(sum of the replicas' ``dsv32_load`` / target).

    Serve wraps it with the deployment's min/max replicas and up/down-scale
    delays. Before any replica has reported, it keeps the current target.
    """

    def __init__(self, target: float):
        if target <= 0:
            raise ValueError("target must be > 0")
        self.target = float(target)

    def __call__(self, ctx) -> tuple[int, dict]:
        loads = (ctx.aggregated_metrics or {}).get(LOAD_METRIC) or {}
        if not loads:
            return ctx.target_num_replicas, {}
        return max(1, math.ceil(sum(loads.values()) / self.target)), {}
