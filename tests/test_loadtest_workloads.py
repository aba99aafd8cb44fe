"""Trace parsing (good and malformed lines) and the workloads built from it and from settings."""

import json

import numpy as np
import pytest

from dsv32_loadtest.tokens import ORDINARY_IDS, TokenSource
from dsv32_loadtest.trace import TraceError, read_trace
from dsv32_loadtest.workloads import MixedWorkload, SessionWorkload, SyntheticWorkload, TraceWorkload

GOOD = [
    {"timestamp": 0, "input_length": 700, "output_length": 5, "hash_ids": [1, 2]},
    {"timestamp": 2500, "input_length": 300, "output_length": 7, "hash_ids": [1], "session_id": "c-1"},
    {"timestamp": 1000, "input_length": 10, "output_length": 1, "session_id": 42},
]


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_read_good_trace(tmp_path):
    p = _write(tmp_path / "t.jsonl", [GOOD[0], "", GOOD[1], "   ", GOOD[2]])
    entries = read_trace(p)
    assert [e.line for e in entries] == [1, 3, 5]
    assert entries[0].hash_ids == (1, 2) and entries[1].session_id == "c-1" and entries[2].session_id == "42"
    assert entries[2].timestamp_ms == 1000.0 and entries[2].output_length == 1
    assert len(read_trace(p, limit=2)) == 2


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"input_length": 5, "output_length": 5}, "'timestamp'"),
    ({"timestamp": -1, "input_length": 5, "output_length": 5}, "'timestamp'"),
    ({"timestamp": 1, "output_length": 5}, "'input_length'"),
    ({"timestamp": 1, "input_length": 0, "output_length": 5}, "'input_length'"),
    ({"timestamp": 1, "input_length": 5, "output_length": 2.5}, "'output_length'"),
    ({"timestamp": 1, "input_length": True, "output_length": 5}, "'input_length'"),
    ({"timestamp": 1, "input_length": 5, "output_length": 5, "hash_ids": ["a"]}, "'hash_ids'"),
    ({"timestamp": 1, "input_length": 5, "output_length": 5, "hash_ids": 3}, "'hash_ids'"),
    ({"timestamp": 1, "input_length": 5, "output_length": 5, "session_id": [1]}, "'session_id'"),
], ids=["json", "array", "no-ts", "neg-ts", "no-input", "zero-input", "float-output", "bool-input",
        "hash-str", "hash-int", "session-list"])
def test_malformed_line_names_the_line(tmp_path, bad, message):
    p = _write(tmp_path / "bad.jsonl", [GOOD[0], GOOD[1], bad, GOOD[2]])
    with pytest.raises(TraceError) as e:
        read_trace(p)
    assert "bad.jsonl:3: " in str(e.value) and message in str(e.value)
    with pytest.raises(TraceError, match="bad.jsonl:3: "):
        TraceWorkload(str(p))  # a trace workload parses its file up front


def test_empty_and_missing_trace(tmp_path):
    with pytest.raises(TraceError, match="holds no request"):
        read_trace(_write(tmp_path / "empty.jsonl", ["", ""]))
    with pytest.raises(TraceError, match="cannot read trace"):
        read_trace(tmp_path / "nope.jsonl")


def test_trace_workload_shares_prefix_blocks(tmp_path):
    w = TraceWorkload(str(_write(tmp_path / "t.jsonl", GOOD)), block_size=512, time_scale=2.0)
    convs = w.build(None, TokenSource(seed=3, vocab_size=129280))
    assert [c.turns[0].output_len for c in convs] == [5, 1, 7]           # timestamp order
    assert [c.arrival_s for c in convs] == [0.0, 0.5, 1.25]              # ms -> s, twice as fast
    long, short = convs[0].turns[0].user_ids, convs[2].turns[0].user_ids
    assert (len(long), len(short)) == (700, 300)
    assert long[:300] == short                                           # hash id 1 = the same 512 tokens
    assert convs[1].session_id == "42" and convs[2].session_id == "c-1"
    assert len(w.build(2, TokenSource(seed=3)) ) == 2


def test_synthetic_lengths():
    tokens = TokenSource(seed=0, vocab_size=129280)
    fixed = SyntheticWorkload(input_len=32, output_len=8).build(20, tokens)
    assert all(len(c.turns[0].user_ids) == 32 and c.turns[0].output_len == 8 for c in fixed)
    ranged = SyntheticWorkload(input_len=100, output_len=50, range_ratio=0.5).build(500, tokens)
    ins = [len(c.turns[0].user_ids) for c in ranged]
    outs = [c.turns[0].output_len for c in ranged]
    assert min(ins) >= 50 and max(ins) <= 150 and min(outs) >= 25 and max(outs) <= 75
    assert np.mean(ins) == pytest.approx(100, rel=0.05)
    ids = np.concatenate([c.turns[0].user_ids for c in ranged])
    assert ids.min() >= ORDINARY_IDS[0] and ids.max() < ORDINARY_IDS[1]
    again = SyntheticWorkload(input_len=100, output_len=50, range_ratio=0.5).build(500, tokens)
    assert [c.turns[0].user_ids for c in again] == [c.turns[0].user_ids for c in ranged]


def test_token_ids_fit_a_small_vocabulary():
    ids = TokenSource(seed=0, vocab_size=512).random(1000, np.random.default_rng(0))
    assert min(ids) >= 2 and max(ids) < 512


def test_mixed_is_an_exact_mix():
    convs = MixedWorkload(input_len=16, output_len=32, long_input_len=256, long_output_len=4,
                          long_fraction=0.25).build(40, TokenSource())
    longs = [c for c in convs if c.kind == "long"]
    assert len(longs) == 10
    assert all(len(c.turns[0].user_ids) == 256 and c.turns[0].output_len == 4 for c in longs)
    assert all(len(c.turns[0].user_ids) == 16 for c in convs if c.kind == "chat")


def test_sessions_grow_their_history():
    w = SessionWorkload(turns=3, input_len=4, output_len=2, shared_prefix_len=8, prefix_groups=2)
    convs = w.build(7, TokenSource())
    assert [len(c.turns) for c in convs] == [3, 3, 1]                    # 7 requests in all
    assert convs[0].prefix_ids == convs[2].prefix_ids != convs[1].prefix_ids
    c = convs[0]
    replies = [[9, 9], [8, 8]]
    p2 = c.prompt_ids(2, replies)
    assert p2 == c.prefix_ids + c.turns[0].user_ids + [9, 9] + c.turns[1].user_ids + [8, 8] + c.turns[2].user_ids
    assert c.prompt_ids(0, []) == c.prefix_ids + c.turns[0].user_ids
    assert len({c.session_id for c in convs}) == 3


@pytest.mark.parametrize("make", [
    lambda: SyntheticWorkload(input_len=0), lambda: SyntheticWorkload(range_ratio=1.0),
    lambda: MixedWorkload(long_fraction=1.5), lambda: SessionWorkload(turns=0),
    lambda: TraceWorkload("x.jsonl", time_scale=0),
], ids=["zero-len", "ratio", "fraction", "turns", "time-scale"])
def test_invalid_workloads(make):
    with pytest.raises(ValueError):
        make()


def test_text_source_tokenizes_random_words():
    pytest.importorskip("dsv32_text.tokenizer")
    source = TokenSource(seed=0, vocab_size=129280, source="text")
    ids = source.random(200, np.random.default_rng(0))
    assert len(ids) == 200 and max(ids) < 129280
    assert ids == TokenSource(seed=0, vocab_size=129280, source="text").random(200, np.random.default_rng(0))
    from dsv32_text.tokenizer import load_tokenizer
    words = load_tokenizer(None).decode(ids).split()
    assert len(words) > 100 and all(w.isalpha() for w in words[1:-1])
