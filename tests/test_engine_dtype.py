"""Compute dtype: ``auto`` picks bf16 where matrix products are native in bf16, fp32 stays the default
on CPU (the oracle mode), and bf16 agrees with fp32 within a stated bound.

The bound. bf16 keeps 8 mantissa bits: each rounding is a relative error of up to 2^-9. The tiny
random checkpoint's logits are large on purpose (its LM head is scaled for a clear argmax, |logit|
~ 16-32), and bf16's step there is 0.125-0.25, so each logit carries ~0.1 of rounding on top of
the activations' rounding through 4 layers (hidden 128: little averaging), and the cache's
rounding grows with every decoded token. Measured over 16 prompts x 16 tokens: chosen-token
log-prob differences up to 0.45 nats, greedy splits only at fp32 top-2 margins under 1.0.
``BOUND = 1.0`` nats: wherever fp32's top-2 margin exceeds it, bf16 must pick the same token, and
the chosen token's log-prob must agree within it. The checkpoint is stored in bf16 (so both dtypes run the same weights) and its
``index_topk`` covers the whole context: with random weights the indexer's scores are nearly
uniform, and a bf16 rounding can swap which tokens make the top-k cut, which is not a bounded
change (the dense attention is then over a different set).
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import tiny_checkpoint

BOUND = 1.0


def test_auto_is_bf16_exactly_where_the_cpu_multiplies_bf16_natively():
    from dsv32_engine.engine import _dtype, cpu_has_native_bf16

    want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert _dtype("auto", torch.device("cpu")) == want
    assert _dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert _dtype(None, torch.device("cpu")) == torch.float32  # the default stays the oracle mode


def test_bad_dtype_is_a_config_error():
    from dsv32_engine.config import ConfigError
    from dsv32_engine.engine_config import EngineConfig

    with pytest.raises(ConfigError, match="dtype must be one of"):
        EngineConfig("x", dtype="fp16")


@pytest.mark.slow
def test_bf16_agrees_with_fp32_within_the_bound():
    from dsv32_engine import LLM, SamplingParams

    model = tiny_checkpoint("bf16", index_topk=2048)
    prompts = [[(i * 7919 + j * 104729) % 90000 + 200 for j in range(10 + 25 * i)] for i in range(8)]
    sp = SamplingParams(temperature=0.0, max_tokens=16, logprobs=2, ignore_eos=True)
    ref = LLM(model=model, dtype="fp32").generate(prompts, sp)
    got = LLM(model=model, dtype="bf16").generate(prompts, sp)
    compared = 0
    for r, g in zip(ref, got):
        r, g = r.outputs[0], g.outputs[0]
        for t, (a, b, la, lb) in enumerate(zip(r.token_ids, g.token_ids, r.logprobs, g.logprobs)):
            first, second = sorted(la.values(), reverse=True)[:2]
            if a != b:
                assert first - second <= BOUND, f"step {t}: bf16 chose {b} over {a} at an fp32 margin {first - second}"
                break  # the contexts differ from here on
            assert abs(la[a] - lb[b]) <= BOUND
            compared += 1
    assert compared >= 25
