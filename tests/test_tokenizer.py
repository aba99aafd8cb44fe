"""Tokenizer: DeepSeek ids, round trips, ｜DSML｜, checkpoint files, torch-freedom."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv32_text import tokenizer as tokmod
from dsv32_text.tokenizer import DSML_TOKEN, load_tokenizer, write_tokenizer_files

TEXTS = {
    "ascii": "Hello world! How are you?",
    "leading_space": "  two leading spaces and a trailing one ",
    "code": "def f(x):\n\treturn x ** 2  # square\n",
    "chinese": "明天杭州和北京的天气怎么样？",
    "emoji": "weather 🌤️ calendar 📅 party 🎉",
    "digits": "1234567 3.14159 -42",
    "dsml": '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n',
    "chat_markers": "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>",
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.mark.parametrize(
    "token, expected_id",
    [
        ("<｜begin▁of▁sentence｜>", 0),
        ("<｜end▁of▁sentence｜>", 1),
        ("<｜User｜>", 128803),
        ("<｜Assistant｜>", 128804),
        ("<think>", 128798),
        ("</think>", 128799),
        (DSML_TOKEN, 128793),
    ],
    ids=["bos", "eos", "user", "assistant", "think", "end_think", "dsml"],
)
def test_known_ids(tok, token, expected_id):
    assert tok.token_to_id(token) == expected_id
    assert tok.id_to_token(expected_id) == token
    assert tok.encode(token) == [expected_id]


def test_sizes_and_bos_eos(tok):
    assert tok.vocab_size == len(tok) == 128815  # 128000 BPE + added, < 129280 embedding rows
    assert (tok.bos_token_id, tok.eos_token_id, tok.dsml_token_id) == (0, 1, 128793)
    assert {0, 1, 128793} <= tok.special_token_ids
    assert 128803 not in tok.special_token_ids  # <｜User｜> is not flagged special


def test_encode_adds_no_bos(tok):
    ids = tok.encode("hello")
    assert ids and ids[0] != tok.bos_token_id and tok.eos_token_id not in ids


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [t for t in tok.convert_ids_to_tokens(ids)] == [tok.id_to_token(i) for i in ids]
    assert all(tok.token_to_id(t) == i for t, i in zip(tok.convert_ids_to_tokens(ids), ids))


def test_dsml_is_one_special_token(tok):
    ids = tok.encode("<｜DSML｜invoke")
    assert ids.count(128793) == 1 and len(ids) < 5
    assert tok.decode(ids, skip_special_tokens=True) == "<invoke"
    assert tok.decode(ids) == "<｜DSML｜invoke"


def test_unknown_lookups(tok):
    assert tok.id_to_token(10**7) is None
    assert tok.token_to_id("not-a-token-at-all-☃☃☃") is None


def test_checkpoint_tokenizer_takes_precedence(tmp_path):
    # The raw V3 file has no ｜DSML｜: loading it proves the dir's file was used.
    shutil.copy(tokmod.bundled_tokenizer_json(), tmp_path / "tokenizer.json")
    own = load_tokenizer(str(tmp_path))
    assert own.dsml_token_id is None
    assert own.id_to_token(128793) == "<｜place▁holder▁no▁793｜>"
    assert own.source == str(tmp_path / "tokenizer.json")


def test_dir_without_tokenizer_falls_back(tmp_path):
    assert load_tokenizer(str(tmp_path)).dsml_token_id == 128793


def test_missing_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "nope"))


def test_add_dsml_token_appends_without_placeholder():
    data = {"added_tokens": [{"id": 5, "content": "<x>", "special": True}], "model": {"vocab": {"a": 0, "b": 1}}}
    tokmod.add_dsml_token(data)
    assert data["added_tokens"][-1]["id"] == 6 and data["added_tokens"][-1]["content"] == DSML_TOKEN
    tokmod.add_dsml_token(data)  # idempotent
    assert sum(t["content"] == DSML_TOKEN for t in data["added_tokens"]) == 1


def test_written_files(tmp_path, tok, hf_config_dir):
    paths = write_tokenizer_files(tmp_path / "ckpt")
    assert sorted(p.name for p in paths) == ["tokenizer.json", "tokenizer_config.json"]
    official = json.loads((hf_config_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert json.loads(paths[1].read_text(encoding="utf-8")) == official
    loaded = load_tokenizer(str(tmp_path / "ckpt"))
    assert loaded.source.endswith("tokenizer.json") and loaded.dsml_token_id == 128793
    for text in TEXTS.values():
        assert loaded.encode(text) == tok.encode(text)


def test_transformers_autotokenizer_loads_written_dir(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    write_tokenizer_files(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(hf) == 128815
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 1)
    assert hf.convert_tokens_to_ids(DSML_TOKEN) == 128793
    for text in TEXTS.values():
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text), text  # same ids, spaces kept (no Llama/Metaspace rewrite)
        assert hf.decode(ids) == text


def test_text_layer_does_not_import_torch():
    engine_dir = Path(tokmod.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(engine_dir), os.environ.get("PYTHONPATH", "")]))
    code = (
        "import dsv32_text.tokenizer, dsv32_text.encoding, dsv32_text.detokenizer, sys; "
        "dsv32_text.tokenizer.load_tokenizer(None).encode('x'); "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
