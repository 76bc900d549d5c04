"""Pretraining data: TextFiles (tokenize + cache + stream), LitData / TinyLlama mixing, prepare scripts."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import train_bpe_tokenizer
from litllm.data import LitData, TextFiles, TinyLlama
from litllm.data.text_files import _pick_validation_files, _split_text, list_files
from litllm.errors import LitLLMError
from litllm.tokenizer import Tokenizer

TEXTS = {
    "a.txt": "First file. The quick brown fox jumps over the lazy dog.\n" * 12,
    "b.txt": "Second file: def fibonacci(n):\n    return n if n < 2 else n\n" * 10,
    "sub/c.txt": "Third file, in a sub-folder. café 東京 🙂\n" * 12,
}


def write_texts(folder: Path, texts: dict[str, str]) -> Path:
    for name, text in texts.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def all_tokens(folder: Path) -> list[int]:
    """Every token of an optimized folder, in chunk order (blocks of 1 token: nothing is dropped)."""
    from litdata import StreamingDataset, TokensLoader

    dataset = StreamingDataset(str(folder), item_loader=TokensLoader(block_size=1), shuffle=False)
    return [int(dataset[i][0]) for i in range(len(dataset))]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_bpe_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer):
    """TextFiles over TEXTS, with the same folder as validation data (read in order), prepared once."""
    root = tmp_path_factory.mktemp("textfiles")
    data = write_texts(root / "data", TEXTS)
    dm = TextFiles(
        train_data_path=str(data),
        val_data_path=str(data),
        optimized_dir=root / "optimized",
        num_workers=0,
        optimize_workers=1,
    )
    dm.connect(tokenizer, batch_size=2, max_seq_length=16)
    dm.prepare_data()
    dm.setup()
    return dm


def expected_stream(tokenizer, texts: dict[str, str]) -> list[int]:
    """Files in path order, each `<bos> text <eos>` (this test tokenizer adds BOS by default)."""
    ids = []
    for name in sorted(texts):
        ids += [tokenizer.bos_id] + tokenizer.processor.encode(texts[name], add_special_tokens=False).ids
        ids += [tokenizer.eos_id]
    return ids


def test_text_files_stream_reproduces_the_source_text_in_order(prepared, tokenizer):
    expected = expected_stream(tokenizer, TEXTS)
    batches = list(prepared.val_dataloader())  # unshuffled
    inputs = torch.cat([b["input_ids"] for b in batches])  # (N, T)
    labels = torch.cat([b["labels"] for b in batches])
    assert inputs.dtype == labels.dtype == torch.long and inputs.shape[1] == 16
    # each block of T + 1 tokens is split into inputs [:-1] and next-token labels [1:]
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    blocks = torch.cat([inputs, labels[:, -1:]], dim=1)  # (N, T + 1)
    n = blocks.numel()
    assert n > len(expected) - 17  # only the tail shorter than one block is unread
    assert blocks.reshape(-1).tolist() == expected[:n]
    decoded = tokenizer.decode(blocks.reshape(-1))
    source = "".join(TEXTS[name] for name in sorted(TEXTS))
    assert source.startswith(decoded) and len(decoded) > len(source) - 40


def test_text_files_train_loader_is_shuffled_and_resumable(prepared):
    loader = prepared.train_dataloader()
    batches = list(loader)
    assert batches and all(b["input_ids"].shape == (2, 16) for b in batches)
    in_order = torch.cat([b["input_ids"] for b in prepared.val_dataloader()])
    assert not torch.equal(torch.cat([b["input_ids"] for b in batches])[: len(in_order)], in_order)

    # exact resume: a new loader restored from the state after 2 batches yields the 3rd batch
    loader = prepared.train_dataloader()
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    state = loader.state_dict()
    third = next(it)
    resumed = prepared.train_dataloader()
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["input_ids"], third["input_ids"])
    assert torch.equal(first[0]["input_ids"], batches[0]["input_ids"])  # same seed, same order


def test_text_files_cache_is_reused_and_keyed_by_files(prepared, tokenizer, monkeypatch):
    dirs = prepared.cache_dirs()
    assert all((d / "index.json").is_file() for d in dirs.values())
    # a second prepare_data finds the cache and tokenizes nothing
    monkeypatch.setattr("litllm.data.text_files.optimize_tokens", lambda *a, **k: pytest.fail("re-tokenized"))
    prepared.prepare_data()
    # the cache key does not depend on the context length
    other = TextFiles(**{f: getattr(prepared, f) for f in ("train_data_path", "val_data_path", "optimized_dir")})
    other.connect(tokenizer, batch_size=1, max_seq_length=4)
    assert other.cache_dirs() == dirs


def test_text_files_cache_key_changes_with_content(tmp_path, tokenizer):
    data = write_texts(tmp_path / "data", {"a.txt": "one\n", "b.txt": "two\n"})
    dm = TextFiles(train_data_path=str(data), optimized_dir=tmp_path / "opt")
    dm.connect(tokenizer, 1, 8)
    before = dm.cache_dirs()
    (data / "b.txt").write_text("two, edited\n")
    assert dm.cache_dirs()["train"] != before["train"]
    other_tokenizer = Tokenizer(train_bpe_tokenizer(tmp_path / "tok2", vocab_size=300))
    dm.connect(other_tokenizer, 1, 8)
    (data / "b.txt").write_text("two\n")
    assert dm.cache_dirs()["train"] != before["train"]


def test_text_files_validation_split(tmp_path, tokenizer):
    data = write_texts(tmp_path / "data", {f"f{i:02d}.txt": f"file {i:02d}\n" for i in range(20)})  # 9 bytes each
    dm = TextFiles(train_data_path=str(data), val_split_fraction=0.1, seed=1)
    splits = dm.split_inputs()
    train, val = {s[0] for s in splits["train"]}, {s[0] for s in splits["val"]}
    assert len(val) == 2 and len(train) == 18 and not train & val
    assert TextFiles(train_data_path=str(data), val_split_fraction=0.1, seed=1).split_inputs() == splits
    assert TextFiles(train_data_path=str(data), val_split_fraction=0.1, seed=2).split_inputs() != splits
    assert "val" not in TextFiles(train_data_path=str(data), val_split_fraction=0).split_inputs()
    assert len(TextFiles(train_data_path=str(data), max_files=5).split_inputs()["train"]) == 4

    # a single file: the last fraction of its lines is held out
    one = write_texts(tmp_path / "one", {"only.txt": "".join(f"line {i}\n" for i in range(100))})
    splits = TextFiles(train_data_path=str(one), val_split_fraction=0.25).split_inputs()
    assert splits == {"train": [(str(one / "only.txt"), 0.0, 0.75)], "val": [(str(one / "only.txt"), 0.75, 1.0)]}


def test_validation_files_hold_a_fraction_of_the_bytes():
    sizes = [1000] + [10] * 99  # one big file, many small ones: 1990 bytes
    picked = _pick_validation_files(sizes, 0.1, seed=0)
    assert 0 not in picked and 199 <= sum(sizes[i] for i in picked) < 199 + 10  # the big file would swamp it
    assert _pick_validation_files(sizes, 0.1, seed=0) == picked != _pick_validation_files(sizes, 0.1, seed=1)
    assert len(_pick_validation_files([5, 5], 0.01, seed=0)) == 1  # always something to validate on
    assert len(_pick_validation_files([10, 10, 10], 0.9, seed=0)) == 2  # and something to train on


def test_split_text_cuts_after_newlines_and_loses_nothing():
    text = "".join(f"line number {i}\n" for i in range(200)) + "x" * 50
    pieces = _split_text(text, 100)
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(len(p) <= 100 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-2])
    assert _split_text("y" * 250, 100) == ["y" * 100, "y" * 100, "y" * 50]  # no newline: hard cut


def test_python_stdlib_source_and_globs(tmp_path):
    files = list_files("python-stdlib", "**/*.py", max_files=50)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) == 50 and all(f.suffix == ".py" and stdlib in f.parents for f in files)
    everything = list_files("python-stdlib", "**/*.py")
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in everything)
    assert any(f.name == "os.py" for f in everything)

    write_texts(tmp_path / "mixed", {"a.txt": "a", "b.py": "b", "deep/c.txt": "c"})
    assert [f.name for f in list_files(tmp_path / "mixed", "*.txt")] == ["a.txt"]
    assert [f.name for f in list_files(tmp_path / "mixed", "**/*.txt")] == ["a.txt", "c.txt"]
    assert list_files(tmp_path / "mixed" / "b.py", "**/*.txt") == [tmp_path / "mixed" / "b.py"]  # one file


def test_text_files_errors(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LitLLMError, match=r"empty: no files match '\*\*/\*\.txt'"):
        TextFiles(train_data_path=str(tmp_path / "empty")).split_inputs()
    with pytest.raises(LitLLMError, match="missing: data folder not found"):
        TextFiles(train_data_path=str(tmp_path / "missing")).split_inputs()
    (tmp_path / "notes" / "sub").mkdir(parents=True)  # a recipe's glob carried over to a folder of other files
    for name in ("a.md", "sub/b.md", "c.txt"):
        (tmp_path / "notes" / name).write_text("text")
    with pytest.raises(LitLLMError, match=r"notes: no files match '\*\.py' \(it holds 2 \*\.md file\(s\): "
                                          r"--data.glob '\*\*/\*\.md'\)"):
        TextFiles(train_data_path=str(tmp_path / "notes"), glob="*.py").split_inputs()
    with pytest.raises(LitLLMError, match="val_split_fraction"):
        TextFiles(val_split_fraction=1.0)
    dm = TextFiles(train_data_path=str(tmp_path))
    with pytest.raises(LitLLMError, match="a tokenizer is needed"):
        dm.prepare_data()
    dm.connect(tokenizer, 1, None)
    with pytest.raises(LitLLMError, match="positive max_seq_length"):
        dm.setup()


def test_text_files_with_only_empty_files_fails_cleanly(tmp_path, tokenizer):
    data = write_texts(tmp_path / "data", {"a.txt": "", "b.txt": ""})
    dm = TextFiles(train_data_path=str(data), val_split_fraction=0, optimized_dir=tmp_path / "opt", optimize_workers=1)
    dm.connect(tokenizer, 1, 8)
    with pytest.raises(LitLLMError, match="no tokens were produced"):
        dm.prepare_data()
    assert not (tmp_path / "opt").exists() or not any((tmp_path / "opt").rglob("index.json"))


def test_text_files_too_little_data_for_one_block(prepared, tokenizer):
    dm = TextFiles(**{f: getattr(prepared, f) for f in ("train_data_path", "val_data_path", "optimized_dir")})
    dm.connect(tokenizer, 1, 100_000)
    with pytest.raises(LitLLMError, match="fewer than max_seq_length"):
        dm.setup()


# ---------------------------------------------------------------------- LitData / TinyLlama
def test_lit_data_mixes_weighted_sources(prepared):
    train_dir = str(prepared.cache_dirs()["train"])
    # two sources: the same tokens read twice; the mix yields from both, val streams in order
    dm = LitData(data_path=[train_dir, train_dir], weights=[3, 1], val_data_path=train_dir, num_workers=0)
    dm.connect(None, batch_size=2, max_seq_length=8)
    dm.prepare_data()
    dm.setup()
    batches = list(dm.train_dataloader())
    # the mix ends when a source runs out, possibly inside a batch
    assert len(batches) > 2 and all(b["input_ids"].shape == (2, 8) for b in batches[:-1])
    assert torch.equal(batches[0]["input_ids"][:, 1:], batches[0]["labels"][:, :-1])
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"][0].tolist() == all_tokens(Path(train_dir))[:8]

    single = LitData(data_path=train_dir, num_workers=0)
    single.connect(None, 2, 8)
    single.prepare_data()
    single.setup()
    assert single.val_dataloader() is None and len(list(single.train_dataloader())) > 0


def test_lit_data_errors(tmp_path, prepared):
    train_dir = str(prepared.cache_dirs()["train"])
    with pytest.raises(LitLLMError, match="2 weights given for 1 data paths"):
        LitData(data_path=train_dir, weights=[1, 2]).prepare_data()
    with pytest.raises(LitLLMError, match="missing not found"):
        LitData(data_path=str(tmp_path / "missing")).prepare_data()
    with pytest.raises(LitLLMError, match="not a litdata optimized folder"):
        LitData(data_path=str(tmp_path)).prepare_data()
    with pytest.raises(LitLLMError, match="TinyLlama slimpajama/train"):
        TinyLlama(data_path=str(tmp_path)).prepare_data()
    LitData(data_path="s3://bucket/tokens").prepare_data()  # remote folders are litdata's to check


def make_raw_downloads(root: Path, code_files: int = 1) -> tuple[Path, Path, dict[str, list[list[str]]], list[list[str]]]:
    """SlimPajama .jsonl.zst (2 chunk folders per split) and StarCoder .parquet laid out like the real downloads.

    Returns (slimpajama dir, starcoder dir, {split: the kept documents of each file}, sources of each parquet file).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    raw = root / "SlimPajama-627B"
    docs: dict[str, list[list[str]]] = {}
    for split in ("train", "validation"):
        for chunk in (1, 2):
            rows = [
                {"text": f"{split} chunk {chunk} document {i}.", "meta": {"redpajama_set_name": name}}
                for i, name in enumerate(["RedPajamaC4", "RedPajamaGithub", "RedPajamaWikipedia"])
            ]
            docs.setdefault(split, []).append(
                [r["text"] for r in rows if "Github" not in r["meta"]["redpajama_set_name"]]
            )
            path = raw / split / f"chunk{chunk}" / f"example_{split}_0.jsonl.zst"
            path.parent.mkdir(parents=True)
            path.write_bytes(zstandard.ZstdCompressor().compress("\n".join(json.dumps(r) for r in rows).encode()))
    code = root / "starcoderdata"
    (code / "python").mkdir(parents=True)
    sources = []
    for f in range(code_files):
        sources.append([f"def f{f}_{i}():\n    return {i}\n" for i in range(6)])
        pq.write_table(
            pa.table({"content": sources[-1], "max_stars_count": list(range(6))}),
            code / "python" / f"train-{f:05d}-of-{code_files:05d}.parquet",
        )
    return raw, code, docs, sources


def optimized_documents(tokenizer, folder: Path) -> list[str]:
    text = tokenizer.decode(all_tokens(folder), skip_special_tokens=False)
    return [d.removeprefix("<s>") for d in text.split("</s>") if d]


def test_prepare_scripts_and_tinyllama(tmp_path, tokenizer):
    """SlimPajama .jsonl.zst and StarCoder .parquet laid out like the real downloads, then the mix."""
    from litllm.data.prepare_slimpajama import prepare as prepare_slimpajama
    from litllm.data.prepare_starcoder import prepare as prepare_starcoder

    raw, code, docs_of_file, sources_of_file = make_raw_downloads(tmp_path)
    docs = {split: [d for file in files for d in file] for split, files in docs_of_file.items()}
    sources = sources_of_file[0]
    out = tmp_path / "data"
    tokenizer_dir = tokenizer.checkpoint_dir
    prepare_slimpajama(raw, out / "slimpajama", tokenizer_dir, num_workers=1)
    prepare_starcoder(code, out / "starcoder", tokenizer_dir, languages=["python"])

    def documents(folder: Path) -> list[str]:
        return optimized_documents(tokenizer, folder)

    assert sorted(documents(out / "slimpajama" / "train")) == sorted(docs["train"])  # no GitHub documents
    assert sorted(documents(out / "slimpajama" / "val")) == sorted(docs["validation"])
    assert sorted(documents(out / "starcoder")) == sorted(sources)

    dm = TinyLlama(data_path=str(out), num_workers=0)
    dm.connect(tokenizer, batch_size=1, max_seq_length=4)
    dm.prepare_data()
    dm.setup()
    # every block comes whole from one source, and both sources are mixed in
    streams = {name: ",".join(map(str, all_tokens(out / name))) for name in ("slimpajama/train", "starcoder")}
    seen = {name: 0 for name in streams}
    for batch in dm.train_dataloader():
        block = ",".join(map(str, batch["input_ids"][0].tolist() + batch["labels"][0, -1:].tolist()))
        sources = [name for name, stream in streams.items() if f",{block}," in f",{stream},"]
        assert sources, "a block that is in no source"
        seen[sources[0]] += 1
    assert all(seen.values()), seen
    assert len(list(dm.val_dataloader())) > 0

    with pytest.raises(LitLLMError, match="unknown split"):
        prepare_slimpajama(raw, out / "x", tokenizer_dir, splits=["dev"])
    with pytest.raises(LitLLMError, match="no .parquet files"):
        prepare_starcoder(tmp_path / "SlimPajama-627B", out / "y", tokenizer_dir)
    with pytest.raises(LitLLMError, match="rust: language folder not found"):
        prepare_starcoder(code, out / "y", tokenizer_dir, languages=["rust"])


def test_prepare_scripts_fast_dev_run(tmp_path, tokenizer, capsys):
    """`--fast_dev_run 1`: one input file per split through litdata's fast dev run, into the real layout,
    marked so that the full run that follows replaces it instead of skipping it."""
    from litllm.data.prepare_slimpajama import prepare as prepare_slimpajama
    from litllm.data.prepare_starcoder import prepare as prepare_starcoder
    from litllm.data.streaming import FAST_DEV_RUN_MARKER

    raw, code, docs_of_file, sources_of_file = make_raw_downloads(tmp_path, code_files=3)
    out = tmp_path / "data"
    tokenizer_dir = tokenizer.checkpoint_dir
    prepare_slimpajama(raw, out / "slimpajama", tokenizer_dir, fast_dev_run=1)
    prepare_starcoder(code, out / "starcoder", tokenizer_dir, fast_dev_run=True)  # true: 2 files
    printed = capsys.readouterr().out
    assert "Tokenizing 1 of 2 train file(s)" in printed and "Tokenizing 2 of 3 file(s)" in printed
    for folder in (out / "slimpajama" / "train", out / "slimpajama" / "val", out / "starcoder"):
        assert (folder / "index.json").is_file() and (folder / FAST_DEV_RUN_MARKER).is_file()
        assert f"fast_dev_run: {folder}: index.json + 1 chunk file(s), " in printed
    for split, name in (("train", "train"), ("validation", "val")):  # exactly one file's documents
        assert sorted(optimized_documents(tokenizer, out / "slimpajama" / name)) in [sorted(d) for d in docs_of_file[split]]
    got = sorted(optimized_documents(tokenizer, out / "starcoder"))
    assert got in [sorted(a + b) for i, a in enumerate(sources_of_file) for b in sources_of_file[i + 1:]]

    # the full run replaces the dev run's folders (a complete full output would be skipped)
    prepare_slimpajama(raw, out / "slimpajama", tokenizer_dir, splits=["train"], num_workers=1)
    prepare_starcoder(code, out / "starcoder", tokenizer_dir)
    assert not (out / "slimpajama" / "train" / FAST_DEV_RUN_MARKER).exists()
    assert sorted(optimized_documents(tokenizer, out / "slimpajama" / "train")) == sorted(
        d for file in docs_of_file["train"] for d in file
    )
    assert sorted(optimized_documents(tokenizer, out / "starcoder")) == sorted(s for f in sources_of_file for s in f)
    capsys.readouterr()
    prepare_starcoder(code, out / "starcoder", tokenizer_dir, fast_dev_run=True)
    assert "already holds tokenized data" in capsys.readouterr().out
    with pytest.raises(LitLLMError, match=r"^--fast_dev_run: expected true, false or a number of input files >= 1, got -1$"):
        prepare_starcoder(code, out / "other", tokenizer_dir, fast_dev_run=-1)
