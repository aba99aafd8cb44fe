"""generation_config.json has one reader, and the router and the engine get the same defaults from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv32_proto import serving_pb2
from dsv32_router.validation import ModelSpec, resolve
from dsv32_text.generation_config import GenerationConfig


def test_the_official_file_and_the_fallbacks(hf_config_dir, tmp_path):
    assert GenerationConfig.from_dir(hf_config_dir) == GenerationConfig(temperature=1.0, top_p=0.95, eos_token_ids=(1,))
    assert GenerationConfig.from_dir(tmp_path) == GenerationConfig(temperature=1.0, top_p=1.0, eos_token_ids=())
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "eos_token_id": [7, 8]}))
    assert GenerationConfig.from_dir(tmp_path) == GenerationConfig(temperature=0.6, top_p=1.0, eos_token_ids=(7, 8))
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ValueError, match="generation_config.json: top_p"):
        GenerationConfig.from_dir(tmp_path)


def _variant(src: str, dst: Path, generation: dict | None) -> str:
    """``src`` with its generation_config.json replaced by ``generation`` (None: no file)."""
    dst.mkdir()
    for f in Path(src).iterdir():
        if f.name != "generation_config.json":
            (dst / f.name).symlink_to(f)
    if generation is not None:
        (dst / "generation_config.json").write_text(json.dumps(generation))
    return str(dst)


class _Tok:
    def encode(self, text):
        return [ord(c) for c in text]


@pytest.mark.slow
@pytest.mark.parametrize("generation", [None, {}, {"temperature": 0.7, "top_p": 0.8}, {"top_p": 0.9}],
                         ids=["absent", "empty", "both", "top_p-only"])
def test_router_and_engine_take_the_same_defaults_from_one_checkpoint(tiny_model, tmp_path, generation):
    from dsv32_engine.engine import EngineCore
    from dsv32_engine.sampling_params import SamplingParams

    model = _variant(tiny_model, tmp_path / "ckpt", generation)
    engine = EngineCore(model, num_pages=4)
    spec = ModelSpec.from_checkpoint(model)
    engine_side = SamplingParams().with_defaults(engine.generation_defaults)
    router_side = resolve(serving_pb2.GenerateRequest(prompt="hi"), _Tok(), spec).sampling
    assert (router_side.temperature, router_side.top_p) == pytest.approx((engine_side.temperature, engine_side.top_p))
    expected = GenerationConfig.from_dir(model)
    assert (engine_side.temperature, engine_side.top_p) == pytest.approx((expected.temperature, expected.top_p))
    assert spec.eos_token_id == engine.config.eos_token_id, "the router stops on the id the workers stop on"


@pytest.mark.slow
def test_the_made_checkpoint_gives_both_sides_its_published_defaults(tiny_model):
    from dsv32_engine.engine import EngineCore
    from dsv32_engine.sampling_params import SamplingParams

    engine_side = SamplingParams().with_defaults(EngineCore(tiny_model, num_pages=4).generation_defaults)
    spec = ModelSpec.from_checkpoint(tiny_model)
    assert (engine_side.temperature, engine_side.top_p) == (spec.default_temperature, spec.default_top_p)
    assert (spec.default_temperature, spec.default_top_p) == pytest.approx((1.0, 0.95))
