"""Structured output in the engine: a JSON schema as a logits mask (dsv32_engine.grammar, llguidance).

Random weights still give schema-valid JSON; constrained rows batch with
unconstrained ones without changing them; a continuation that replays the
generated tokens (a retry on another worker) gives the same answer as one run.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from checkpoints import tiny_checkpoint
from dsv32_engine import LLM, SamplingParams
from dsv32_engine.grammar import GrammarError

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_checkpoint("fp32", seed=0), num_pages=64, max_num_batched_tokens=256)


def _constrained(seed: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=80, json_schema=json.dumps(SCHEMA), **kw)


def test_batched_with_unconstrained_requests(llm):
    free = [SamplingParams(temperature=0.8, seed=s, max_tokens=12) for s in range(3)]
    alone = [o.outputs[0].token_ids for o in llm.generate(["Hello"] * 3, free)]
    outs = llm.generate(["Hello", "Hi", "Hello", "Name?", "Hello"],
                        [_constrained(1), free[0], free[1], _constrained(2), free[2]])
    assert [outs[i].outputs[0].token_ids for i in (2, 4)] == alone[1:]  # the mask touches only its own rows
    for i in (0, 3):
        c = outs[i].outputs[0]
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_replay_continues_the_same_answer(llm):
    prompt = [0, 128803, 33310, 128804]
    [full] = llm.generate([prompt], _constrained(5))
    ids = full.outputs[0].token_ids
    k = len(ids) // 2
    [cont] = llm.generate([prompt + ids[:k]], _constrained(5, grammar_replay=k))
    assert ids[:k] + cont.outputs[0].token_ids[:len(ids) - k] == ids
    with pytest.raises(GrammarError):  # tokens the grammar refuses cannot be replayed
        llm.generate([prompt + [33310, 33310]], _constrained(5, grammar_replay=2))
