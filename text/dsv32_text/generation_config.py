"""The checkpoint's ``generation_config.json``: sampling defaults and end-of-sequence ids.

The one reader of that file. The router (the defaults of a request that leaves
a sampling field unset: ``dsv32_router.validation.ModelSpec``) and the engine
(``EngineCore``, for ``SamplingParams`` fields left ``None``) both call
:meth:`GenerationConfig.from_dir`, so a request served by the cluster and the
same request run offline through ``LLM`` are sampled with the same defaults.

Read: ``temperature``, ``top_p`` and ``eos_token_id`` (an id or a list of ids).
Ignored: ``do_sample`` (temperature 0 is how a request asks for greedy),
``top_k`` and the rest; requests default to top-k off.

Fallbacks, when the file is absent or a field is missing, are those of
``transformers.GenerationConfig``: temperature 1.0, top_p 1.0 (no nucleus cut
that the checkpoint did not ask for) and no eos ids (then the model config's
``eos_token_id`` is the only one). DeepSeek-V3.2 ships temperature 1.0 and
top_p 0.95.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

FILENAME = "generation_config.json"


@dataclass(frozen=True)
class GenerationConfig:
    temperature: float = 1.0
    """Default sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Default nucleus mass, in (0, 1]; 1 = off."""
    eos_token_ids: tuple[int, ...] = ()
    """Ids that end generation according to this file, first one first; may be empty."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(t, int) or t < 0 for t in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be non-negative integers, got {self.eos_token_ids}")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> GenerationConfig:
        """The defaults of the checkpoint in ``model_dir`` (the fallbacks above without the file)."""
        path = Path(model_dir) / FILENAME
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        eos = raw.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        try:
            return cls(temperature=float(raw.get("temperature", cls.temperature)),
                       top_p=float(raw.get("top_p", cls.top_p)), eos_token_ids=eos)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def sampling_defaults(self) -> dict[str, float]:
        """The defaults of the sampling fields a request may leave unset."""
        return {"temperature": self.temperature, "top_p": self.top_p}
