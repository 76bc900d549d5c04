"""Fine-tuning data: record parsing and errors, prompt masks, chats, collation, order, Hub data sets."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

from conftest import train_bpe_tokenizer
from litllm.data import JSON, LIMA, Alpaca, Alpaca2k, AlpacaGPT4, Dolly, PadCollate
from litllm.data.sft import parse_record, split_records, tokenize_records
from litllm.errors import LitLLMError
from litllm.prompts import PromptStyle
from litllm.tokenizer import Tokenizer

RECORDS = [
    {"instruction": "Name three colors.", "input": "", "output": "Red, green and blue."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Add the numbers.", "output": "12345 + 1 = 12346"},  # no "input" key at all
    {"instruction": "Write a haiku.", "input": None, "output": "Leaves drift on cold wind."},
]
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What does the fox do?"},
        {"role": "assistant", "content": "It jumps over the lazy dog."},
    ]
}


def write_json(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_bpe_tokenizer(tmp_path_factory.mktemp("tok")))


def setup_json(tokenizer, path, max_seq_length=-1, batch_size=2, **kwargs) -> JSON:
    dm = JSON(json_path=path, **kwargs)
    dm.connect(tokenizer, batch_size=batch_size, max_seq_length=max_seq_length)
    dm.setup()
    return dm


def target_spans(tokenizer, labels: torch.Tensor) -> list[str]:
    """Decoded runs of consecutive trained labels."""
    spans, run = [], []
    for label in labels.tolist() + [-100]:
        if label != -100:
            run.append(label)
        elif run:
            spans.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    return spans


# ---------------------------------------------------------------------- instruction records
@pytest.mark.parametrize("mask_prompt", [True, False])
def test_mask_prompt_puts_ignore_index_exactly_on_prompt_tokens(tmp_path, tokenizer, mask_prompt):
    path = write_json(tmp_path / "data.json", RECORDS)
    dm = setup_json(tokenizer, path, val_split_fraction=0, mask_prompt=mask_prompt, prompt_style="alpaca")
    style = PromptStyle.from_name("alpaca")
    samples = sorted(dm.train_dataset.samples, key=lambda s: len(s["input_ids"]))
    expected = []
    for record in RECORDS:
        prompt = style.encode(tokenizer, style.apply(record["instruction"], input=record.get("input") or "")).tolist()
        reply = tokenizer.encode(record["output"], bos=False).tolist() + [tokenizer.eos_id]
        expected.append((prompt, reply))
    assert len(samples) == len(RECORDS)
    for prompt, reply in sorted(expected, key=lambda pr: len(pr[0]) + len(pr[1])):
        sample = next(s for s in samples if s["input_ids"].tolist() == (prompt + reply)[:-1])
        labels = sample["labels"].tolist()
        if mask_prompt:
            # the targets of positions 0 .. P-2 are prompt tokens 1 .. P-1; position P-1 predicts the reply
            assert labels[: len(prompt) - 1] == [-100] * (len(prompt) - 1)
            assert labels[len(prompt) - 1 :] == reply
        else:
            assert labels == (prompt + reply)[1:]
    # the reply text (with EOS) is what is trained on, the input text is in the prompt
    translate = next(s for s in samples if "Bonjour" in tokenizer.decode(s["labels"][s["labels"] != -100]))
    assert "### Input:\nGood morning" in tokenizer.decode(translate["input_ids"])
    if mask_prompt:
        assert target_spans(tokenizer, translate["labels"]) == ["Bonjour</s>"]


def test_input_is_kept_for_styles_without_an_input_field(tmp_path, tokenizer):
    path = write_json(tmp_path / "data.jsonl", RECORDS[1:2])
    dm = setup_json(tokenizer, path, val_split_fraction=0, prompt_style="chatml")
    text = tokenizer.decode(dm.train_dataset[0]["input_ids"], skip_special_tokens=False)
    assert (
        text == "<s><|im_start|>user\nTranslate to French.\n\nGood morning<|im_end|>\n<|im_start|>assistant\nBonjour"
    )  # stops before EOS


def test_ignore_index_and_style_default(tmp_path, tokenizer):
    path = write_json(tmp_path / "data.json", RECORDS)
    dm = setup_json(tokenizer, path, val_split_fraction=0, ignore_index=-1)
    assert dm.style.name == "alpaca"  # a tokenizer folder with neither chat template nor prompt_style.yaml
    labels = torch.cat([s["labels"] for s in dm.train_dataset.samples])
    assert (labels == -1).any() and not (labels == -100).any()


# ---------------------------------------------------------------------- conversations
def test_conversation_loss_on_assistant_turns_only(tmp_path, tokenizer):
    path = write_json(tmp_path / "chat.jsonl", [CHAT])
    dm = setup_json(tokenizer, path, val_split_fraction=0, prompt_style="chatml")
    sample = dm.train_dataset[0]
    tokens = sample["input_ids"].tolist() + sample["labels"][-1:].tolist()
    rendered = PromptStyle.from_name("chatml").render_messages(CHAT["messages"], add_generation_prompt=False)
    assert tokenizer.decode(tokens, skip_special_tokens=False) == "<s>" + rendered
    # <|im_end|> ends each turn (a stop token of the style), so no EOS is added
    assert target_spans(tokenizer, sample["labels"]) == [
        "Hello!<|im_end|>\n",
        "It jumps over the lazy dog.<|im_end|>\n",
    ]

    # a template with no end-of-turn marker (Alpaca): each assistant turn is closed with EOS
    dm = setup_json(tokenizer, path, val_split_fraction=0, prompt_style="alpaca")
    assert target_spans(tokenizer, dm.train_dataset[0]["labels"]) == [
        "Hello!\n\n</s>",
        "It jumps over the lazy dog.\n\n</s>",
    ]

    # without mask_prompt every token is a target
    dm = setup_json(tokenizer, path, val_split_fraction=0, prompt_style="chatml", mask_prompt=False)
    assert not (dm.train_dataset[0]["labels"] == -100).any()


def test_conversation_with_the_checkpoint_chat_template(tmp_path, tokenizer):
    folder = train_bpe_tokenizer(tmp_path / "chat_tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    chat_tokenizer = Tokenizer(folder)
    dm = setup_json(chat_tokenizer, write_json(tmp_path / "chat.json", [CHAT]), val_split_fraction=0)
    assert dm.style.name == "chat_template"
    sample = dm.train_dataset[0]
    assert sample["input_ids"].tolist().count(chat_tokenizer.bos_id) == 1  # the template's BOS, not a second one
    assert target_spans(chat_tokenizer, sample["labels"]) == [
        "Hello!<|im_end|>\n",
        "It jumps over the lazy dog.<|im_end|>\n",
    ]


# ---------------------------------------------------------------------- long records
def test_long_records_truncate_skip_error(tmp_path, tokenizer, capsys):
    records = RECORDS + [{"instruction": "Repeat.", "output": "word " * 200}]
    path = write_json(tmp_path / "data.json", records)
    limit = max(
        len(
            tokenize_records([parse_record(r, "r")], tokenizer, PromptStyle.from_name("alpaca"), -1, True, -100)[0][
                "input_ids"
            ]
        )
        for r in RECORDS[:4]
    )

    dm = setup_json(tokenizer, path, max_seq_length=limit, val_split_fraction=0, prompt_style="alpaca")
    assert len(dm.train_dataset) == 5 and max(len(s["input_ids"]) for s in dm.train_dataset.samples) == limit
    assert (
        f"JSON train: 1 of 5 records are longer than max_seq_length + 1 = {limit + 1} tokens: 1 truncated"
        in capsys.readouterr().out
    )

    dm = setup_json(
        tokenizer, path, max_seq_length=limit, val_split_fraction=0, long_records="skip", prompt_style="alpaca"
    )
    assert len(dm.train_dataset) == 4
    assert "1 skipped" in capsys.readouterr().out

    with pytest.raises(
        LitLLMError, match=rf"data.json record 4: \d+ tokens, longer than max_seq_length \+ 1 = {limit + 1}"
    ):
        setup_json(
            tokenizer, path, max_seq_length=limit, val_split_fraction=0, long_records="error", prompt_style="alpaca"
        )

    # truncation that leaves no reply token drops the record (it would only add a zero-loss sample)
    with pytest.raises(LitLLMError, match="JSON: every training record was dropped"):
        setup_json(tokenizer, path, max_seq_length=8, val_split_fraction=0, prompt_style="alpaca")
    assert (
        "5 of 5 records are longer than max_seq_length + 1 = 9 tokens: 5 dropped (no reply token fit)"
        in capsys.readouterr().out
    )


# ---------------------------------------------------------------------- errors name the file and record
@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.json", [{"instruction": "a", "output": 5}], r"bad.json record 0: 'output' must be a string, got int"),
        (
            "bad.json",
            [RECORDS[0], {"instruction": ["a"], "output": "b"}],
            r"bad.json record 1: 'instruction' must be a string, got list",
        ),
        (
            "bad.jsonl",
            [RECORDS[0], {"instruction": "a", "input": 3, "output": "b"}],
            r"bad.jsonl record 1 \(line 2\): 'input' must be a string",
        ),
        ("bad.json", [{"instruction": "a"}], r"bad.json record 0: missing key 'output'"),
        ("bad.json", ["just text"], r"bad.json record 0: expected a JSON object, got str"),
        ("bad.json", '[{"instruction": "a",}]', r"bad.json: invalid JSON at line 1, column 22"),
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n', r"bad.jsonl: line 2 is not valid JSON"),
        ("bad.json", "", r"bad.json: the file is empty"),
        ("bad.json", "[]", r"bad.json: no records \(an empty list\)"),
        ("bad.jsonl", "\n\n", r"bad.jsonl: no records \(no JSON lines\)"),
        (
            "bad.json",
            {"instruction": "a", "output": "b"},
            r"bad.json: expected a list of records at the top level, got dict",
        ),
        ("bad.txt", [RECORDS[0]], r"bad.txt: expected a .json or .jsonl file"),
        ("bad.json", [{"messages": []}], r"bad.json record 0: 'messages' must be a non-empty list"),
        (
            "bad.json",
            [{"messages": [{"role": "user", "content": "hi"}]}],
            r"bad.json record 0: 'messages' has no assistant turn",
        ),
        (
            "bad.json",
            [{"messages": [{"role": "bot", "content": "hi"}]}],
            r"bad.json record 0: messages\[0\]: role must be one of",
        ),
        (
            "bad.json",
            [{"messages": [{"role": "user", "content": 1}]}],
            r"bad.json record 0: messages\[0\]: 'content' must be a string",
        ),
    ],
)
def test_record_errors_name_file_and_record(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in content), encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(LitLLMError, match=message):
        setup_json(tokenizer, path, val_split_fraction=0)


def test_path_errors(tmp_path, tokenizer):
    with pytest.raises(LitLLMError, match="missing.json: file or folder not found"):
        setup_json(tokenizer, tmp_path / "missing.json")
    (tmp_path / "folder").mkdir()
    with pytest.raises(LitLLMError, match="folder: no train.json or train.jsonl"):
        setup_json(tokenizer, tmp_path / "folder")
    write_json(tmp_path / "one.json", RECORDS[:1])
    with pytest.raises(LitLLMError, match="long_records must be truncate, skip or error"):
        setup_json(tokenizer, tmp_path / "one.json", val_split_fraction=0, long_records="cut")
    with pytest.raises(LitLLMError, match="unknown prompt style 'nope'"):
        setup_json(tokenizer, tmp_path / "one.json", val_split_fraction=0, prompt_style="nope")
    with pytest.raises(LitLLMError, match=r"--data.prompt_style: unknown prompt style 'alpca' \(did you mean alpaca\?\)"):
        setup_json(tokenizer, tmp_path / "one.json", val_split_fraction=0, prompt_style="alpca")
    with pytest.raises(LitLLMError, match="a tokenizer is needed"):
        JSON(json_path=tmp_path / "one.json").setup()


# ---------------------------------------------------------------------- splits, order, collation
def test_a_single_record_trains_without_validation(tmp_path, tokenizer, capsys):
    """A validation fraction (the default 0.05 too) can't split one record: train on it, say so in one line."""
    write_json(tmp_path / "one.json", RECORDS[:1])
    dm = setup_json(tokenizer, tmp_path / "one.json", val_split_fraction=0.5)
    assert len(dm.train_dataset) == 1 and dm.val_dataset is None and dm.val_dataloader() is None
    out = capsys.readouterr().out
    assert out.count("too few to split off a validation set; training without validation") == 1
    assert dm.longest_sample() == len(dm.train_dataset[0]["input_ids"])


def test_folder_with_train_and_val_files(tmp_path, tokenizer):
    write_json(tmp_path / "d" / "train.jsonl", RECORDS)
    write_json(tmp_path / "d" / "val.json", RECORDS[:1])
    dm = setup_json(tokenizer, tmp_path / "d")
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 1
    write_json(tmp_path / "d" / "val.jsonl", RECORDS[:1])
    with pytest.raises(LitLLMError, match="both val.json and val.jsonl exist"):
        setup_json(tokenizer, tmp_path / "d")


def test_seeded_validation_split():
    records = [parse_record({"instruction": f"q{i}", "output": f"a{i}"}, f"r{i}") for i in range(100)]
    train, val = split_records(records, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90 and not {r.origin for r in train} & {r.origin for r in val}
    assert [r.origin for r in split_records(records, 0.1, seed=3)[1]] == [r.origin for r in val]
    assert [r.origin for r in split_records(records, 0.1, seed=4)[1]] != [r.origin for r in val]


def test_sft_order_is_deterministic_for_a_seed(tmp_path, tokenizer):
    records = [{"instruction": f"Question number {i}?", "output": f"Answer {i}."} for i in range(24)]
    path = write_json(tmp_path / "data.jsonl", records)

    def order(seed: int, loader=None) -> list[list[int]]:
        if loader is None:
            loader = setup_json(tokenizer, path, val_split_fraction=0, seed=seed, batch_size=3).train_dataloader()
        return [b["input_ids"].tolist() for b in loader]

    first = order(1)
    assert order(1) == first  # a re-created module and loader give the same order
    assert order(2) != first
    dm = setup_json(tokenizer, path, val_split_fraction=0, seed=1, batch_size=3)
    assert order(1, dm.train_dataloader()) == order(1, dm.train_dataloader()) == first
    assert sorted(sum(first, [])) != sum(first, [])  # shuffled, not in file order
    val = setup_json(tokenizer, path, val_split_fraction=0.25, seed=1, batch_size=3)
    assert [b["input_ids"].tolist() for b in val.val_dataloader()] == [
        b["input_ids"].tolist() for b in val.val_dataloader()
    ]


def test_collation_pads_to_the_longest(tmp_path, tokenizer):
    samples = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 7, 8])},
        {"input_ids": torch.tensor([9]), "labels": torch.tensor([10])},
    ]
    batch = PadCollate(pad_id=3, ignore_index=-100)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 7, 8], [10, -100, -100]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long

    dm = setup_json(tokenizer, write_json(tmp_path / "d.json", RECORDS), val_split_fraction=0, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    lengths = sorted(len(s["input_ids"]) for s in dm.train_dataset.samples)
    assert batch["input_ids"].shape == (4, lengths[-1])
    shortest = min(range(4), key=lambda i: (batch["labels"][i] != -100).nonzero().max())
    pad = batch["input_ids"].shape[1] - lengths[0]
    assert pad > 0 and batch["input_ids"][shortest, -pad:].tolist() == [0] * pad  # no pad token: 0
    assert batch["labels"][shortest, -pad:].tolist() == [-100] * pad


def test_alpaca_demo_data(shared_data, tokenizer):
    dm = setup_json(tokenizer, shared_data / "alpaca_en_demo.json", max_seq_length=4096, val_split_fraction=0.05)
    assert len(dm.train_dataset) + len(dm.val_dataset) == len(
        json.loads((shared_data / "alpaca_en_demo.json").read_text())
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape


# ---------------------------------------------------------------------- public data sets
def alpaca_like_rows(n: int) -> list[dict]:
    return [
        {"instruction": f"Task {i}", "input": "context" if i % 2 else "", "output": f"Done {i}", "text": "x"}
        for i in range(n)
    ]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def setup_set(module, tokenizer):
    module.connect(tokenizer, batch_size=2, max_seq_length=-1)
    module.prepare_data()  # the file is already in download_dir: no network
    module.setup()
    return module


def test_each_set_parses_its_real_record_format(tmp_path, tokenizer):
    write_json(tmp_path / "alpaca" / "alpaca_data_cleaned.json", alpaca_like_rows(40))
    dm = setup_set(Alpaca(download_dir=tmp_path / "alpaca", val_split_fraction=0.1), tokenizer)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (36, 4)

    for cls, folder in ((Alpaca2k, "alpaca2k"), (AlpacaGPT4, "gpt4")):
        write_parquet(tmp_path / folder / "default" / "train" / "0000.parquet", alpaca_like_rows(20))
        dm = setup_set(cls(download_dir=tmp_path / folder), tokenizer)
        assert (len(dm.train_dataset), len(dm.val_dataset)) == (19, 1)

    dolly = [
        {"instruction": f"Q{i}", "context": "Some context." if i else "", "response": f"R{i}", "category": "qa"}
        for i in range(10)
    ]
    write_json(tmp_path / "dolly" / "databricks-dolly-15k.jsonl", dolly)
    dm = setup_set(Dolly(download_dir=tmp_path / "dolly", val_split_fraction=0.2), tokenizer)
    texts = [tokenizer.decode(s["input_ids"]) for s in dm.train_dataset.samples + dm.val_dataset.samples]
    assert len(texts) == 10 and sum("### Input:\nSome context." in t for t in texts) == 9

    lima = [
        {"conversations": ["What is 2+2?", "4."], "source": "stackexchange"},
        {"conversations": ["Hi", "Hello!", "How are you?", "Fine."], "source": "multi_turn"},
    ] * 5
    write_json(tmp_path / "lima" / "train.jsonl", lima)
    dm = setup_set(LIMA(download_dir=tmp_path / "lima", val_split_fraction=0, prompt_style="chatml"), tokenizer)
    spans = [target_spans(tokenizer, s["labels"]) for s in dm.train_dataset.samples]
    assert sorted(map(tuple, spans))[0] == ("4.</s>",) and ("Hello!</s>",) in map(tuple, spans)  # first pair only
    dm = setup_set(
        LIMA(
            download_dir=tmp_path / "lima",
            val_split_fraction=0,
            prompt_style="chatml",
            include_multiturn_conversations=True,
        ),
        tokenizer,
    )
    spans = [target_spans(tokenizer, s["labels"]) for s in dm.train_dataset.samples]
    assert ["Hello!<|im_end|>\n", "Fine.<|im_end|>\n"] in spans

    write_json(tmp_path / "bad" / "databricks-dolly-15k.jsonl", [{"instruction": "Q", "answer": "A"}])
    with pytest.raises(LitLLMError, match="record 0 \\(line 1\\): expected a Dolly record"):
        setup_set(Dolly(download_dir=tmp_path / "bad"), tokenizer)


class _FakeHub(BaseHTTPRequestHandler):
    """The two requests `hf_hub_download` makes: HEAD (metadata headers) and GET of a resolve URL."""

    files: dict[str, bytes] = {}

    def do_HEAD(self):
        self._reply(body=False)

    def do_GET(self):
        self._reply(body=True)

    def _reply(self, body: bool) -> None:
        data = self.files.get(unquote(self.path.split("?")[0]))
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_download_from_a_hub_endpoint(tmp_path, tokenizer):
    """The real huggingface_hub download path against a local Hub on 127.0.0.1 (in a subprocess, so the
    endpoint and online mode are set the way users set them: environment variables)."""
    dolly = [{"instruction": f"Q{i}", "context": "", "response": f"R{i}", "category": "qa"} for i in range(10)]
    parquet = write_parquet(tmp_path / "src.parquet", alpaca_like_rows(20))
    _FakeHub.files = {
        "/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl": "".join(
            json.dumps(r) + "\n" for r in dolly
        ).encode(),
        "/datasets/mhenrichsen/alpaca_2k_test/resolve/refs/convert/parquet/default/train/0000.parquet": parquet.read_bytes(),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = (
        "import sys\nfrom pathlib import Path\nfrom litllm.data import Dolly, Alpaca2k, LIMA\nfrom litllm.errors import LitLLMError\n"
        "root = Path(sys.argv[1])\n"
        "Dolly(download_dir=root / 'dolly').prepare_data()\n"
        "Alpaca2k(download_dir=root / 'alpaca2k').prepare_data()\n"
        "try:\n    LIMA(download_dir=root / 'lima').prepare_data()\nexcept LitLLMError as e:\n    print(e)\n"
    )
    env = dict(
        os.environ,
        HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert message.startswith("--data LIMA: could not download train.jsonl from the Hugging Face dataset GAIR/lima")
    assert f"put the file at {tmp_path / 'lima' / 'train.jsonl'}," in message and "--data JSON" in message
    assert len(message.splitlines()) == 1
    assert not (tmp_path / "lima").exists()  # nor huggingface_hub's lock and metadata files

    dm = setup_set(Dolly(download_dir=tmp_path / "dolly", val_split_fraction=0.2), tokenizer)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (8, 2)
    dm = setup_set(Alpaca2k(download_dir=tmp_path / "alpaca2k"), tokenizer)
    assert len(dm.train_dataset) + len(dm.val_dataset) == 20


def test_cli_builds_every_data_module_from_flags(tmp_path):
    """jsonargparse class-path flags (`--data JSON --data.json_path ...`) with attribute docstrings as help."""
    from typing import Optional

    from jsonargparse import ArgumentParser, set_parsing_settings

    from litllm.data import DataModule, TextFiles, TinyLlama

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=Optional[DataModule], default=None)
    cases = {
        "JSON": (["--data.json_path", "x.jsonl", "--data.mask_prompt", "false", "--data.long_records", "skip"], JSON),
        "Alpaca": (["--data.download_dir", "d"], Alpaca),
        "LIMA": (["--data.include_multiturn_conversations", "true"], LIMA),
        "TextFiles": (
            ["--data.train_data_path", "python-stdlib", "--data.glob", "**/*.py", "--data.max_files", "3"],
            TextFiles,
        ),
        "TinyLlama": (["--data.data_path", "s3://bucket/data"], TinyLlama),
    }
    for name, (flags, cls) in cases.items():
        config = parser.parse_args(["--data", name, *flags])
        module = parser.instantiate(config).data
        assert type(module) is cls
    assert module.data_path == "s3://bucket/data"
    config = parser.parse_args(["--data", "JSON", "--data.json_path", "x.jsonl", "--data.mask_prompt", "false"])
    assert parser.instantiate(config).data.mask_prompt is False
    help_text = subprocess.run(
        [
            sys.executable,
            "-c",
            "from typing import Optional\nfrom jsonargparse import ArgumentParser, set_parsing_settings\n"
            "from litllm.data import DataModule\nset_parsing_settings(docstring_parse_attribute_docstrings=True)\n"
            "p = ArgumentParser()\np.add_argument('--data', type=Optional[DataModule])\np.parse_args(['--data.help', 'JSON'])",
        ],
        capture_output=True,
        text=True,
    ).stdout
    assert "Compute the loss on replies only" in help_text and "--data.json_path" in help_text
