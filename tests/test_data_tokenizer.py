"""`litllm train_tokenizer`: a byte-level BPE that litllm's Tokenizer and transformers both load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SAMPLE_TEXT
from litllm.data.train_tokenizer import ENDOFTEXT, train_tokenizer
from litllm.errors import LitLLMError
from litllm.tokenizer import Tokenizer

PROBES = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n",
    "Unicode: café, naïve, 東京, emoji 🙂 — and\ttabs,   runs of spaces\r\n",
    "I'll say it's 12345 or 3.14159; DON'T shout!!!",
    "",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (data / f"doc{i}.txt").write_text(SAMPLE_TEXT * (i + 1), encoding="utf-8")
    (data / "ignored.md").write_text("not read", encoding="utf-8")
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(str(data), out, vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"])
    return out


def test_litllm_and_transformers_load_it_identically(trained):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer(trained)
    theirs = transformers.AutoTokenizer.from_pretrained(trained)
    assert ours.vocab_size == 400 == len(theirs)
    assert ours.bos_id == ours.eos_id == ours.token_to_id(ENDOFTEXT) == theirs.eos_token_id == theirs.bos_token_id
    assert ours.stop_ids == [ours.eos_id]
    for text in PROBES:
        ids = ours.encode(text).tolist()
        assert ids == theirs(text)["input_ids"]  # no BOS added by either
        assert ours.decode(ids) == text == theirs.decode(ids)  # byte-level: exact round trip
    assert ours.encode("hi", eos=True).tolist()[-1] == ours.eos_id
    # special tokens are single tokens, never split
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert ours.encode(chat).tolist()[0] == ours.token_to_id("<|im_start|>") == theirs(chat)["input_ids"][0]
    config = json.loads((trained / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["eos_token"] == ENDOFTEXT


def test_merges_are_learned_from_the_corpus(trained):
    tokenizer = Tokenizer(trained)
    # frequent corpus words compress well below one token per byte; random bytes do not
    assert len(tokenizer.encode(" quick brown fox")) <= 8  # 16 bytes
    assert len(tokenizer.encode("zqxj")) >= 3


def test_trains_on_python_stdlib_sources(tmp_path):
    train_tokenizer("python-stdlib", tmp_path, vocab_size=320, glob="**/*.py", max_files=5)
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.decode(tokenizer.encode("import os\n")) == "import os\n"


def test_errors(tmp_path):
    with pytest.raises(LitLLMError, match="--vocab_size must be at least 257"):
        train_tokenizer(str(tmp_path), tmp_path / "out", vocab_size=100)
    with pytest.raises(LitLLMError, match=r"no files match '\*\*/\*\.txt'"):
        train_tokenizer(str(tmp_path), tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "litllm",
            "train_tokenizer",
            "--data_path",
            str(data),
            "--out_dir",
            str(tmp_path / "tok"),
            "--vocab_size",
            "300",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert Tokenizer(tmp_path / "tok").vocab_size == 300
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "litllm",
            "train_tokenizer",
            "--data_path",
            str(tmp_path / "missing"),
            "--out_dir",
            str(tmp_path / "tok2"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing'}: data folder not found"
