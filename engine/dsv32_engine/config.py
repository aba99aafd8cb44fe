"""Model configuration read from a checkpoint's ``config.json``.

One typed dataclass, validated in ``__post_init__``. Fields we do not know are
an error that names them (a typo in a config must not silently become a
default); fields we know but whose value we do not implement (another
``scoring_func``, another quantisation) are an error too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("deepseek_v32", "deepseek_v3")

# Present in real checkpoints, harmless to us (bookkeeping or consumed elsewhere).
_IGNORED_KEYS = {
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "attention_dropout", "ep_size", "pretraining_tp", "pad_token_id",
    "num_key_value_heads", "_name_or_path", "tie_word_embeddings", "output_router_logits",
    "aux_loss_alpha", "seq_aux", "head_dim", "layer_types", "mlp_layer_types", "rope_parameters",
}


class ConfigError(ValueError):
    """A config.json we cannot serve; the message names the offending field(s)."""


@dataclass
class ModelConfig:
    """The subset of the HF ``DeepseekV32Config`` the engine reads (spec §1)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 163840
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    num_nextn_predict_layers: int = 0
    bos_token_id: int = 0
    eos_token_id: int = 1
    quantization_config: dict | None = None
    model_type: str = "deepseek_v32"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported (expected one of {SUPPORTED_MODEL_TYPES})")
        bad = []
        if self.scoring_func != "sigmoid":
            bad.append(f"scoring_func={self.scoring_func!r} (only 'sigmoid')")
        if self.topk_method != "noaux_tc":
            bad.append(f"topk_method={self.topk_method!r} (only 'noaux_tc')")
        if self.hidden_act != "silu":
            bad.append(f"hidden_act={self.hidden_act!r} (only 'silu')")
        if self.attention_bias:
            bad.append("attention_bias=true (DeepSeek MLA has no biases)")
        if self.moe_layer_freq != 1:
            bad.append(f"moe_layer_freq={self.moe_layer_freq} (only 1)")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                bad.append(f"rope_scaling.type={kind!r} (only 'yarn' or no scaling)")
        q = self.quantization_config
        if q is not None:
            if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3" or list(q.get("weight_block_size", [128, 128])) != [128, 128]:
                bad.append(f"quantization_config={q} (only fp8 e4m3 with 128x128 weight blocks)")
        if bad:
            raise ConfigError("unsupported config values: " + "; ".join(bad))
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"]
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.has_moe:
            if not self.n_routed_experts or not self.num_experts_per_tok:
                raise ConfigError("MoE layers need n_routed_experts and num_experts_per_tok")
            if self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                raise ConfigError("num_experts_per_tok exceeds the experts available in topk_group groups")
        if self.model_type == "deepseek_v32":
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                if not getattr(self, name) or getattr(self, name) <= 0:
                    raise ConfigError(f"deepseek_v32 config needs a positive {name}")
            if self.index_head_dim < self.qk_rope_head_dim:
                raise ConfigError("index_head_dim must be at least qk_rope_head_dim")

    # -- derived ---------------------------------------------------------------
    @property
    def has_indexer(self) -> bool:
        """DeepSeek Sparse Attention is on (V3.2); a deepseek_v3 config runs dense MLA."""
        return self.model_type == "deepseek_v32"

    @property
    def has_moe(self) -> bool:
        return self.num_hidden_layers > self.first_k_dense_replace and bool(self.n_routed_experts)

    def is_moe_layer(self, layer: int) -> bool:
        return self.has_moe and layer >= self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_fp8_checkpoint(self) -> bool:
        return self.quantization_config is not None

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim^-0.5 · m²`` with the YaRN mscale correction (spec §3.3)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            factor = float(rs["factor"])
            if factor > 1:
                m = 0.1 * float(rs["mscale_all_dim"]) * math.log(factor) + 1.0
                scale *= m * m
        return scale

    # -- io --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in raw if k not in known and k not in _IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        if "model_type" not in raw:
            raise ConfigError("config has no model_type")
        kwargs = {k: v for k, v in raw.items() if k in known}
        missing = [f.name for f in fields(cls) if f.name not in kwargs and f.default is _MISSING_SENTINEL]
        if missing:
            raise ConfigError(f"config is missing required fields: {', '.join(missing)}")
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a wrong type slipped through
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} does not exist")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


from dataclasses import MISSING as _MISSING_SENTINEL  # noqa: E402  (used above at call time)
