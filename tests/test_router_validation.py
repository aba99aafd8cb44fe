"""resolve(): defaults, seeds and the status code + field of every refusal (no processes)."""

from __future__ import annotations

import grpc
import pytest

from dsv32_proto import serving_pb2
from dsv32_router.validation import ModelSpec, RequestError, resolve

SPEC = ModelSpec(name="m", max_model_len=100, vocab_size=1000, default_temperature=0.6, default_top_p=0.9)


class Tok:
    def encode(self, text):
        return [ord(c) % 1000 for c in text]


def req(**kw):
    sampling = kw.pop("sampling", {})
    return serving_pb2.GenerateRequest(sampling=serving_pb2.SamplingParams(**sampling), **kw)


def test_defaults_from_generation_config_and_the_context():
    r = resolve(req(prompt="hello"), Tok(), SPEC)
    s = r.sampling
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens) == (pytest.approx(0.6), pytest.approx(0.9), 0, 95)
    assert r.seed_chosen_by_router and 0 <= s.seed < 2**63 and len(r.request_id) == 32
    capped = ModelSpec(**{**SPEC.__dict__, "default_max_tokens": 16})
    assert resolve(req(prompt="hello"), Tok(), capped).sampling.max_tokens == 16
    assert resolve(req(prompt="x" * 95), Tok(), capped).sampling.max_tokens == 5


def test_explicit_values_are_kept():
    r = resolve(req(token_ids=serving_pb2.TokenIds(ids=[1, 2]), request_id="abc", session_id="s-1",
                    sampling=dict(temperature=0.0, top_p=1.0, seed=7, max_tokens=98, stop=["x"])), Tok(), SPEC)
    assert (r.prompt_ids, r.request_id, r.session_id) == ([1, 2], "abc", "s-1")
    assert (r.sampling.temperature, r.sampling.seed, r.sampling.max_tokens, r.sampling.stop) == (0.0, 7, 98, ["x"])
    assert not r.seed_chosen_by_router
    assert r.sampling.remaining(10).max_tokens == 88 and r.sampling.remaining(10).seed == 7


@pytest.mark.parametrize("kw,code,field", [
    (dict(), "INVALID_ARGUMENT", "prompt"),
    (dict(prompt="x" * 100), "OUT_OF_RANGE", "prompt"),
    (dict(prompt="hi", sampling=dict(max_tokens=99)), "INVALID_ARGUMENT", "sampling.max_tokens"),
    (dict(prompt="hi", sampling=dict(top_p=float("nan"))), "INVALID_ARGUMENT", "sampling.top_p"),
    (dict(prompt="hi", sampling=dict(temperature=float("inf"))), "INVALID_ARGUMENT", "sampling.temperature"),
    (dict(prompt="hi", session_id="a b"), "INVALID_ARGUMENT", "session_id"),
    (dict(prompt="hi", sampling=dict(stop=["s"] * 17)), "INVALID_ARGUMENT", "sampling.stop"),
    (dict(prompt="hi", model="other"), "NOT_FOUND", "model"),
    (dict(chat=serving_pb2.ChatInput(messages=[serving_pb2.ChatMessage(role="user", content="x",
                                                                       tool_calls_json="{bad")])),
     "INVALID_ARGUMENT", "chat.messages[0].tool_calls_json"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_refusals_name_the_field(kw, code, field):
    with pytest.raises(RequestError) as e:
        resolve(req(**kw), Tok(), SPEC)
    assert e.value.code == getattr(grpc.StatusCode, code) and e.value.message.startswith(field + ":")
