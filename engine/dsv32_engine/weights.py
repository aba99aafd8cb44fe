"""Load HF safetensors checkpoints (one file or shards + index; bf16/fp32 or FP8).

The model is built on the meta device and each parameter is assigned from the
checkpoint one tensor at a time (safetensors reads are memory-mapped), so the
weights are never held twice. FP8 weights (e4m3 + ``weight_scale_inv`` over
128×128 blocks, spec §8) stay as stored with ``weight_format="fp8"`` (the
default: a :class:`~.fp8_linear.Linear` or the stacked experts then hold the
e4m3 weight and its scales, and multiply through ``fp8_gemm`` on CUDA), or are
dequantised tensor by tensor into the compute dtype with ``"dequant"``.
``kv_b_proj`` is dequantised either way: the absorbed attention reads its weight
as ``W_UK``/``W_UV`` directly (vLLM does the same; ~1 GiB, 0.2% of
DeepSeek-V3.2's bytes). Routed experts are stacked in memory from one entry per expert on disk; an
expert-parallel rank reads only the experts its placement gives it.
The MTP layer (index ``num_hidden_layers``) is skipped: it is not used yet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from dsv32_kernels import fp8
from .config import ConfigError, ModelConfig
from .engine_config import WEIGHT_FORMATS
from .fp8_linear import Linear
from .progress import progress

# Parameters kept in fp32 whatever the compute dtype (REF and HF do the same).
FP32_PARAMS = re.compile(r"(mlp\.gate\.weight|e_score_correction_bias|indexer\.weights_proj\.weight)$")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ROUTED = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")
_ROUTED_PARAM = re.compile(r"\.mlp\.experts\.")  # stacked expert weights and their scales (not shared_experts)
# FP8 in the checkpoint, dequantised at load whatever the weight format (see the module doc)
DEQUANT_ALWAYS = re.compile(r"self_attn\.kv_b_proj\.weight$")


class CheckpointError(ConfigError):
    """A checkpoint that does not fit the config; the message names the tensor."""


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name → shard file."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: d / f for name, f in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in {index.name} does not exist")
        return files
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors files in {d}")
    files = {}
    for f in shards:
        with safe_open(f, framework="pt") as h:
            files.update({k: f for k in h.keys()})
    return files


class _Reader:
    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        f = self.files[name]
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        return self._open[f].get_tensor(name)

    def stored(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One tensor as stored, and its ``weight_scale_inv`` when it is FP8 (else None), both checked."""
        if name not in self.files:
            raise CheckpointError(f"checkpoint is missing tensor {name} (expected shape {list(shape)})")
        t = self.get(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, the config implies {list(shape)}")
        if t.dtype != fp8.FP8:
            if not t.dtype.is_floating_point:
                raise CheckpointError(f"tensor {name} has dtype {t.dtype}, expected a float type")
            return t, None
        scale_name = name.removesuffix("weight") + "weight_scale_inv"
        if scale_name not in self.files:
            raise CheckpointError(f"FP8 tensor {name} has no {scale_name}")
        s = self.get(scale_name)
        want = (-(-shape[0] // 128), -(-shape[1] // 128))
        if tuple(s.shape) != want:
            raise CheckpointError(f"tensor {scale_name} has shape {list(s.shape)}, expected {list(want)}")
        return t, s.float()

    def weight(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """One tensor in ``dtype``, dequantised if stored as FP8 with a ``weight_scale_inv`` beside it."""
        t, s = self.stored(name, shape)
        return (t if s is None else fp8.dequant_weight(t, s, dtype=dtype)).to(dtype)


def load_weights(model: nn.Module, cfg: ModelConfig, model_dir: str | Path, dtype: torch.dtype,
                 device: torch.device | str = "cpu", local_experts: list[int] | None = None,
                 weight_format: str = "fp8") -> None:
    """Assign every parameter of a meta-device ``model`` from the checkpoint.

    ``local_experts``: the routed experts this rank holds (expert parallelism; default all). Only
    their tensors are read; the other experts' entries are accounted for but never touched.
    ``weight_format``: ``fp8`` keeps FP8 weights as stored (with their scales), ``dequant``
    dequantises them into ``dtype``; tensors stored otherwise load as stored (cast to ``dtype``).
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    files = checkpoint_files(model_dir)
    reader = _Reader(files)
    used: set[str] = set()
    experts = list(range(cfg.n_routed_experts or 0)) if local_experts is None else list(local_experts)
    params = list(model.named_parameters())
    for pname, param in progress(params, f"loading {Path(model_dir).name}", "tensor"):
        want = torch.float32 if FP32_PARAMS.search(pname) else dtype
        m = _EXPERT.match(pname)
        if m:
            if param.shape[0] != len(experts):
                raise CheckpointError(f"{pname} holds {param.shape[0]} experts, the placement gives this rank "
                                      f"{len(experts)}")
            names = [f"{m.group(1)}.{e}.{m.group(2)}.weight" for e in experts]
            out, scale = _load_experts(reader, names, tuple(param.shape), want, device, weight_format == "fp8")
            used.update(names)
            if scale is not None:
                _assign(model, pname + "_scale_inv", scale)
        else:
            name = pname  # the checkpoint's own names (e_score_correction_bias too)
            keep = weight_format == "fp8" and isinstance(_owner(model, pname), Linear) \
                and not DEQUANT_ALWAYS.search(pname)
            t, scale = reader.stored(name, tuple(param.shape)) if keep else (None, None)
            if scale is not None:  # stays FP8: e4m3 weight + fp32 scales, as stored
                out = t.to(device)
                _assign(model, pname.removesuffix("weight") + "weight_scale_inv", scale.to(device))
            else:
                out = reader.weight(name, tuple(param.shape), want).to(device)
            used.add(name)
        _assign(model, pname, out)
    for name in files:
        if name.endswith("weight_scale_inv") or (local_experts is not None and _ROUTED.match(name)):
            used.add(name)  # scales were read with their weights; other ranks' experts are theirs to read
    extra = [n for n in files if n not in used and not _is_mtp(n, cfg)]
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} tensors the config does not use, e.g. {sorted(extra)[:5]}")


def _load_experts(reader: _Reader, names: list[str], shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device | str, keep_fp8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One stacked projection ``[E, out, in]`` of the experts ``names`` (and ``[E, ...]`` scales when kept FP8)."""
    _, s0 = reader.stored(names[0], shape[1:]) if names else (None, None)
    if not (keep_fp8 and s0 is not None):
        out = torch.empty(shape, dtype=dtype, device=device)
        for i, name in enumerate(names):
            out[i] = reader.weight(name, shape[1:], dtype)
        return out, None
    out = torch.empty(shape, dtype=fp8.FP8, device=device)
    scale = torch.empty((shape[0], *s0.shape), dtype=torch.float32, device=device)
    for i, name in enumerate(names):
        t, s = reader.stored(name, shape[1:])
        if s is None:
            raise CheckpointError(f"tensor {name} is stored as {t.dtype}, the other experts' as FP8")
        out[i], scale[i] = t, s
    return out, scale


def resident_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the loaded parameters (FP8 scales included), measured from the tensors: routed experts and the rest."""
    routed = other = 0
    for pname, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if _ROUTED_PARAM.search(pname):
            routed += n
        else:
            other += n
    return {"routed_experts": routed, "replicated": other, "total": routed + other}


def checkpoint_weight_bytes(cfg: ModelConfig, model_dir: str | Path,
                            local_experts: list[int] | None = None) -> dict[str, int]:
    """Bytes on disk of the tensors a model (or an expert-parallel rank: ``local_experts``) loads, scales
    included, MTP layer excluded: what ``resident_weight_bytes`` is compared with. Read from the headers."""
    routed = other = 0
    local = None if local_experts is None else set(local_experts)
    for f, entries in _headers(checkpoint_files(model_dir)).items():
        for name, (start, end) in entries.items():
            if _is_mtp(name, cfg):
                continue
            if _ROUTED.match(name):
                if local is None or int(name.split(".experts.")[1].split(".")[0]) in local:
                    routed += end - start
            else:
                other += end - start
    return {"routed_experts": routed, "replicated": other, "total": routed + other}


def _headers(files: dict[str, Path]) -> dict[Path, dict[str, tuple[int, int]]]:
    """Per shard, tensor name → (start, end) byte offsets, from the safetensors header (no data read)."""
    wanted: dict[Path, set[str]] = {}
    for name, f in files.items():
        wanted.setdefault(f, set()).add(name)
    out = {}
    for f, names in wanted.items():
        with open(f, "rb") as h:
            n = int.from_bytes(h.read(8), "little")
            header = json.loads(h.read(n))
        out[f] = {k: tuple(v["data_offsets"]) for k, v in header.items() if k in names}
    return out


def _owner(model: nn.Module, pname: str) -> nn.Module:
    return model.get_submodule(pname.rpartition(".")[0])


def _is_mtp(name: str, cfg: ModelConfig) -> bool:
    m = _LAYER.match(name)
    return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers


def _assign(model: nn.Module, pname: str, value: torch.Tensor) -> None:
    *path, leaf = pname.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
