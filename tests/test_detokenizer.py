"""Incremental detokenizer and stop-string helpers."""

from __future__ import annotations

import random

import pytest

from dsv32_text.detokenizer import IncrementalDetokenizer, find_stop, partial_stop_len
from dsv32_text.tokenizer import load_tokenizer

MULTIBYTE = "明天杭州🌤️和北京📅的天气🎉怎么样？ ümlaut — 日本語テキスト 😀😀 👩‍👩‍👧"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None) -> list[str]:
    """Feed ids in chunks of 1 (or random 1..3 with ``rng``); the last piece is flush()."""
    pieces, i = [], 0
    while i < len(ids):
        k = rng.randrange(1, 4) if rng else 1
        pieces.append(detok.add(ids[i:i + k] if k > 1 else ids[i]))
        i += k
    pieces.append(detok.flush())
    return pieces


def test_multibyte_text_is_split_across_tokens(tok):
    # Guards the tests below: some single tokens must decode to half a character.
    ids = tok.encode(MULTIBYTE)
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("with_prompt", [False, True], ids=["no_prompt", "prompt"])
def test_valid_text_streams_whole_characters(tok, with_prompt):
    ids = tok.encode(MULTIBYTE)
    prompt = tok.encode("<｜User｜>天气<｜Assistant｜>") if with_prompt else None
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    pieces = stream(detok, ids)
    assert "".join(pieces) == MULTIBYTE == detok.text
    assert not any("\ufffd" in p for p in pieces)
    assert detok.token_ids == ids
    assert pieces[-1] == ""  # nothing was left for flush


def _pool(tok) -> list[int]:
    rng = random.Random(1234)
    pieces = set(tok.encode(MULTIBYTE)) | set(tok.encode("<｜DSML｜invoke name=\"x\">\n"))
    specials = {0, 1, 128793, 128798, 128799, 128803, 128804}
    return sorted(pieces | specials | {rng.randrange(tok.vocab_size) for _ in range(50)})


@pytest.mark.parametrize("skip_special", [False, True], ids=["keep_special", "skip_special"])
@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed{s}")
def test_random_sequences_match_full_decode(tok, seed, skip_special):
    rng = random.Random(seed)
    pool = _pool(tok)
    for _ in range(40):
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 60))]
        prompt = tok.encode("prompt 你好") if rng.random() < 0.5 else None
        detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip_special)
        pieces = stream(detok, ids, rng)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special)
        assert detok.text == "".join(pieces)


def test_incomplete_character_is_held_then_flushed(tok):
    emoji_ids = tok.encode("🎉")
    assert len(emoji_ids) == 2
    detok = IncrementalDetokenizer(tok)
    assert detok.add(emoji_ids[0]) == ""
    assert detok.text == ""
    assert detok.flush() == "\ufffd" == tok.decode(emoji_ids[:1])
    assert detok.flush() == ""


def test_incomplete_character_completes(tok):
    a, b = tok.encode("🎉")
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(a), detok.add(b)] == ["", "🎉"]


def test_prompt_ending_mid_character_is_ignored_as_context(tok):
    a, b = tok.encode("🎉")
    detok = IncrementalDetokenizer(tok, prompt_ids=[a])
    assert detok.add(tok.encode("ok")) == "ok"


def test_special_tokens_kept_by_default(tok):
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("a<｜DSML｜invoke") + [1]
    assert "".join(stream(detok, ids)) == "a<｜DSML｜invoke<｜end▁of▁sentence｜>"


@pytest.mark.parametrize(
    "text, stops, start, expected",
    [
        ("hello STOP there", ["STOP"], 0, 6),
        ("hello STOP there", ["STOP"], 8, 6),  # straddles the old/new boundary
        ("hello STOP there", ["STOP"], 10, None),  # already checked: not found again
        ("ab\n\nUser:x", ["User:", "\n\n"], 0, 2),  # earliest wins
        ("no stops here", ["zzz"], 0, None),
        ("anything", [], 0, None),
        ("anything", [""], 0, None),
        ("你好停止了", ["停止"], 3, 2),
    ],
    ids=["plain", "straddle", "already_checked", "earliest", "absent", "no_stops", "empty_stop", "cjk"],
)
def test_find_stop(text, stops, start, expected):
    assert find_stop(text, stops, start) == expected


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("hello ST", ["STOP"], 2),
        ("hello STO", ["STOP", "O"], 3),
        ("hello", ["STOP"], 0),
        ("hello STOP", ["STOP"], 0),  # a full match is find_stop's business
        ("x<", ["<｜end", "<think>"], 1),
    ],
    ids=["prefix2", "longest", "none", "full_match", "markup"],
)
def test_partial_stop_len(text, stops, expected):
    assert partial_stop_len(text, stops) == expected


def test_streaming_with_stop_string(tok):
    """What a router does: detokenize, hold back a possible stop prefix, cut at the stop."""
    text = "The answer is 42.\n\nObservation: done"
    stops = ["\n\nObservation:"]
    detok = IncrementalDetokenizer(tok)
    sent, checked, stopped = "", 0, None
    for tid in tok.encode(text):
        detok.add(tid)
        full = detok.text
        stopped = find_stop(full, stops, checked)
        checked = len(full)
        if stopped is not None:
            sent += full[len(sent):stopped]
            break
        safe = len(full) - partial_stop_len(full, stops)
        assert safe >= len(sent)
        sent += full[len(sent):safe]
    assert stopped == text.index("\n\nObservation:")
    assert sent == "The answer is 42."
