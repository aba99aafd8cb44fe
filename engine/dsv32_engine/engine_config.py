"""How an engine is built: one frozen, validated ``EngineConfig`` (the checkpoint's own config is ``ModelConfig``).

Every option is documented here, once. ``EngineCore(...)`` and ``LLM(...)``
take these fields as keyword arguments, the workers' flags are made from them
(``num_pages`` → ``--num-pages``, by :mod:`dsv32_cluster.flags`, with
``field_docs`` as their help) and ``dsv32-serve up`` passes the same flags on.
Torch-free: the control plane builds the flags without importing the engine.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass, fields

from .config import ConfigError

NUMERICS = ("exact", "fp8")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16")
WEIGHT_FORMATS = ("fp8", "dequant")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    """Checkpoint directory in the Hugging Face layout (config.json, tokenizer files, safetensors)."""
    numerics: str = "exact"
    """exact: float cache pages, no FP8 simulation; fp8: FP8 indexer and the 656-byte FlashMLA latent record."""
    dtype: str | None = None
    """Compute dtype: float32 | bfloat16 (or fp32 | bf16) | auto = bfloat16 on CUDA and on CPUs with native
    bf16 matrix units (AVX512-BF16 / AMX), float32 elsewhere. Unset: bfloat16 on CUDA, float32 on CPU (the
    oracle mode, bit-comparable with transformers). Norms, router scores, softmax and indexer scores are
    computed in float32 whatever the dtype."""
    device: str | None = None
    """cpu | cuda | cuda:N; default: cuda if available."""
    num_pages: int | None = None
    """Cache pages of this engine's pool; default: as many as fit in 256 MiB."""
    max_num_seqs: int = 64
    """Requests in one continuous batch."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step; a prefill runs attention in query blocks of this many tokens."""
    max_model_len: int | None = None
    """Context cap, prompt + output; default: the checkpoint's max_position_embeddings."""
    seed: int | None = None
    """Draws the sampling seed of each request that brings none; default: random."""
    attention_backend: str | None = None
    """torch (the model's own MLA paths) | kernels (dsv32_kernels; Triton on CUDA); default: kernels on CUDA."""
    weight_format: str = "fp8"
    """How an FP8 checkpoint's block-scaled weights are held: fp8 = as stored (e4m3 + weight_scale_inv; fp8_gemm
    on CUDA, dequantised block by block per product on CPU) | dequant = dequantised to the compute dtype at load.
    Checkpoints without FP8 weights load as stored either way."""
    prefix_caching: bool = True
    """on | off: keep computed full pages (latent and indexer) in a prefix cache keyed by their tokens, shared by
    later requests with the same prefix; unreferenced ones are evicted, least recently used first, when pages run
    out."""

    def __post_init__(self) -> None:
        # accepted for convenience, stored as plain strings: a path, a torch.dtype
        object.__setattr__(self, "model", str(self.model) if self.model is not None else "")
        if self.dtype is not None and not isinstance(self.dtype, str):
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        bad = []
        if not self.model:
            bad.append("model: a checkpoint directory is required")
        if self.numerics not in NUMERICS:
            bad.append(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            bad.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            bad.append(f"weight_format must be one of {WEIGHT_FORMATS}, got {self.weight_format!r}")
        for name, low, optional in (("num_pages", 1, True), ("max_num_seqs", 1, False),
                                    ("max_num_batched_tokens", 1, False), ("max_model_len", 1, True)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                bad.append(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.prefix_caching, bool):
            bad.append(f"prefix_caching must be a bool, got {self.prefix_caching!r}")
        if bad:
            raise ConfigError("engine config: " + "; ".join(bad))

    @classmethod
    def of(cls, config: EngineConfig | str | None = None, **options) -> EngineConfig:
        """``config`` as is, or ``EngineConfig(model=config, **options)`` (not both)."""
        if isinstance(config, EngineConfig):
            if options:
                raise TypeError(f"options {sorted(options)} given with an EngineConfig; use dataclasses.replace")
            return config
        return cls(config, **options)


@functools.cache
def field_docs(cls: type = EngineConfig) -> dict[str, str]:
    """Each field's docstring (the string literal under it), as one line; the flags' help."""
    docs, tree = {}, ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return {f.name: docs.get(f.name, "") for f in fields(cls)}
