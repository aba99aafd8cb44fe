"""TokenStream: worker tokens → client text deltas (detokenization, stop strings, EOS)."""

from __future__ import annotations

import pytest

from dsv32_proto import worker_pb2
from dsv32_router.stream import TokenStream
from dsv32_router.validation import ResolvedRequest, Sampling

EOS = 1


@pytest.fixture(scope="module")
def tok():
    from dsv32_text.tokenizer import load_tokenizer

    return load_tokenizer(None)


def _req(stop=(), ignore_eos=False, stop_token_ids=()):
    sp = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=100, seed=0, stop=list(stop),
                  stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
    return ResolvedRequest("r", [5, 6], sp)


def _toks(ids, last_reason=""):
    return [worker_pb2.Token(token_id=t, finished=bool(last_reason) and i == len(ids) - 1,
                             finish_reason=last_reason if i == len(ids) - 1 else "") for i, t in enumerate(ids)]


def test_deltas_concatenate_to_the_decoded_text(tok):
    ids = tok.encode("Hello world, this is a streaming test 你好 🙂")
    s = TokenStream(tok, _req(), EOS)
    msgs = [s.push(_toks([t])) for t in ids[:-1]] + [s.push(_toks([ids[-1]], "length"))]
    assert "".join(m.text for m in msgs if m) == tok.decode(ids)
    assert [t for m in msgs if m for t in m.token_ids] == ids and msgs[-1].finish_reason == "length"
    assert all("\ufffd" not in m.text for m in msgs if m), "never half a character"


def test_stop_string_across_deltas_is_cut_and_never_sent(tok):
    ids = tok.encode("one two three STOP four five")
    s = TokenStream(tok, _req(stop=["STOP"]), EOS)
    sent = ""
    for t in ids:
        m = s.push(_toks([t]))
        if m:
            sent += m.text
            if m.finish_reason:
                break
    assert sent == "one two three " and s.finish_reason == "stop"
    assert "S" not in sent, "a possible stop prefix is held back, not sent and then taken back"


def test_eos_and_stop_tokens_add_no_text_but_are_reported(tok):
    ids = tok.encode("Hi there")
    s = TokenStream(tok, _req(), EOS)
    m = s.push(_toks(ids + [EOS], "stop"))
    assert m.text == "Hi there" and list(m.token_ids) == ids + [EOS] and m.finish_reason == "stop"
    s = TokenStream(tok, _req(stop_token_ids=[ids[-1]]), EOS)
    m = s.push(_toks(ids, "stop"))
    assert m.text == tok.decode(ids[:-1])
    s = TokenStream(tok, _req(ignore_eos=True), EOS)
    m = s.push(_toks(ids + [EOS], "length"))
    assert m.text == tok.decode(ids + [EOS]), "with ignore_eos an EOS is just a token"
