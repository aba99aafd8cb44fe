"""Load HF safetensors checkpoints (one file or shards + index; bf16/fp32 or FP8).

The model is built on the meta device and each parameter is assigned from the
checkpoint one tensor at a time (safetensors reads are memory-mapped), so the
weights are never held twice. FP8 weights (e4m3 + ``weight_scale_inv`` over
128×128 blocks, spec §8) are dequantised tensor by tensor into the compute
dtype. Routed experts are stacked in memory from one entry per expert on disk; an
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
from .progress import progress

# Parameters kept in fp32 whatever the compute dtype (REF and HF do the same).
FP32_PARAMS = re.compile(r"(mlp\.gate\.weight|e_score_correction_bias|indexer\.weights_proj\.weight)$")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ROUTED = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")


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

    def weight(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """One tensor, dequantised if stored as FP8 with a ``weight_scale_inv`` beside it."""
        if name not in self.files:
            raise CheckpointError(f"checkpoint is missing tensor {name} (expected shape {list(shape)})")
        t = self.get(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, the config implies {list(shape)}")
        if t.dtype == fp8.FP8:
            scale_name = name.removesuffix("weight") + "weight_scale_inv"
            if scale_name not in self.files:
                raise CheckpointError(f"FP8 tensor {name} has no {scale_name}")
            s = self.get(scale_name)
            want = (-(-shape[0] // 128), -(-shape[1] // 128))
            if tuple(s.shape) != want:
                raise CheckpointError(f"tensor {scale_name} has shape {list(s.shape)}, expected {list(want)}")
            t = fp8.dequant_weight(t, s)
        elif not t.dtype.is_floating_point:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, expected a float type")
        return t.to(dtype)


def load_weights(model: nn.Module, cfg: ModelConfig, model_dir: str | Path, dtype: torch.dtype,
                 device: torch.device | str = "cpu", local_experts: list[int] | None = None) -> None:
    """Assign every parameter of a meta-device ``model`` from the checkpoint.

    ``local_experts``: the routed experts this rank holds (expert parallelism; default all). Only
    their tensors are read; the other experts' entries are accounted for but never touched.
    """
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
            out = torch.empty(param.shape, dtype=want, device=device)
            for i, e in enumerate(experts):
                name = f"{m.group(1)}.{e}.{m.group(2)}.weight"
                out[i] = reader.weight(name, tuple(param.shape[1:]), want)
                used.add(name)
        else:
            name = pname if pname.endswith(("weight", "bias")) else pname  # e_score_correction_bias keeps its name
            out = reader.weight(name, tuple(param.shape), want).to(device)
            used.add(name)
        _assign(model, pname, out)
    for name in files:
        if name.endswith("weight_scale_inv") or (local_experts is not None and _ROUTED.match(name)):
            used.add(name)  # scales were read with their weights; other ranks' experts are theirs to read
    extra = [n for n in files if n not in used and not _is_mtp(n, cfg)]
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} tensors the config does not use, e.g. {sorted(extra)[:5]}")


def resident_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the loaded parameters, measured from the tensors: routed experts and the rest."""
    routed = other = 0
    for pname, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if _EXPERT.match(pname):
            routed += n
        else:
            other += n
    return {"routed_experts": routed, "replicated": other, "total": routed + other}


def _is_mtp(name: str, cfg: ModelConfig) -> bool:
    m = _LAYER.match(name)
    return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers


def _assign(model: nn.Module, pname: str, value: torch.Tensor) -> None:
    *path, leaf = pname.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
