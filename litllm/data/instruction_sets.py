"""Public instruction-tuning sets, downloaded from the Hugging Face Hub on first use.

`prepare_data()` fetches one file of the data set's Hub repository (`hf_hub_download`) into
`download_dir`; later runs read it from there without network access, and a file put there by hand
is used as is (for machines without internet). Each set's own fields are renamed to the instruction
or conversation shape of `litllm.data.sft`. Sets stored as parquet are read through the Hub's
automatic parquet conversion (revision `refs/convert/parquet`) and need `pyarrow`.

| module       | Hub dataset                      | records | validation             |
|--------------|----------------------------------|---------|------------------------|
| `Alpaca`     | yahma/alpaca-cleaned             | 51,760  | 3.865% split (2,000)   |
| `Alpaca2k`   | mhenrichsen/alpaca_2k_test       | 2,000   | 5% split (100)         |
| `AlpacaGPT4` | vicgalle/alpaca-gpt4             | 52,002  | 3.865% split           |
| `Dolly`      | databricks/databricks-dolly-15k  | 15,011  | 10% split              |
| `LIMA`       | GAIR/lima (gated: accept its terms, then `HF_TOKEN` or `hf auth login`) | 1,030 | 10% split |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from litllm.data.json_data import read_json_records
from litllm.data.sft import Record, SFTDataModule, parse_record, split_records
from litllm.errors import LitLLMError


class HubFile(NamedTuple):
    repo_id: str
    filename: str
    revision: str = "main"


PARQUET_REVISION = "refs/convert/parquet"


def download_dataset_file(source: HubFile, download_dir: Path, name: str = "the data set") -> Path:
    """`download_dir/<filename>`, fetched from the Hub dataset repository unless it is already there.

    A failed download leaves nothing behind (huggingface_hub's lock and metadata files included) and
    says how to do without the network. `name` is the data module's name, for the message.
    """
    target = Path(download_dir) / source.filename
    if target.is_file():
        return target
    from huggingface_hub import hf_hub_download

    from litllm.utils import unreachable_reason

    created = next((p for p in [Path(download_dir), *Path(download_dir).parents][::-1] if not p.exists()), None)
    try:
        path = hf_hub_download(
            source.repo_id, source.filename, repo_type="dataset", revision=source.revision, local_dir=download_dir
        )
    except Exception as e:  # network, auth (gated sets), missing file: one clear line either way
        import shutil

        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        reason = unreachable_reason(e)
        if reason is None:
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            reason = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        raise LitLLMError(
            f"--data {name}: could not download {source.filename} from the Hugging Face dataset {source.repo_id}"
            f" ({reason}); connect to the internet (with HF_HUB_OFFLINE unset) to fetch it once, put the file at"
            f" {target}, or train on your own file with --data JSON --data.json_path <file.json>"
        ) from None
    return Path(path)


def read_raw_records(path: Path) -> list[tuple[Any, str]]:
    """`(raw record, origin)` pairs of a downloaded `.json`, `.jsonl` or `.parquet` file."""
    if path.suffix != ".parquet":
        return read_json_records(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LitLLMError(f"{path}: reading parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        raise LitLLMError(f"{path}: not a readable parquet file ({e})") from None
    if not rows:
        raise LitLLMError(f"{path}: no records (the file is empty)")
    return [(row, f"{path} row {i}") for i, row in enumerate(rows)]


@dataclass(kw_only=True)
class HubInstructionSet(SFTDataModule):
    """A public data set: one Hub file, a converter of its records, a seeded validation split."""

    source: ClassVar[HubFile]
    download_dir: Path = Path("data")
    """Where the data file is downloaded (and read from on later runs)."""

    def convert(self, raw: Any, origin: str) -> list[Record]:
        """This set's raw record -> validated records (the default: already in instruction shape)."""
        return [parse_record(raw, origin)]

    def prepare_data(self) -> None:
        download_dataset_file(self.source, self.download_dir, type(self).__name__)

    def load_records(self) -> tuple[list[Record], list[Record]]:
        path = download_dataset_file(self.source, self.download_dir, type(self).__name__)
        records = [record for raw, origin in read_raw_records(path) for record in self.convert(raw, origin)]
        return split_records(records, self.val_split_fraction, self.seed)


@dataclass(kw_only=True)
class Alpaca(HubInstructionSet):
    """Stanford Alpaca, cleaned (yahma/alpaca-cleaned): 51,760 instruction/input/output records."""

    source: ClassVar[HubFile] = HubFile("yahma/alpaca-cleaned", "alpaca_data_cleaned.json")
    download_dir: Path = Path("data/alpaca")
    """Where the data file is downloaded (and read from on later runs)."""
    val_split_fraction: float = 0.03865
    """Fraction held out for validation (0.03865 gives 2,000 records)."""


@dataclass(kw_only=True)
class Alpaca2k(HubInstructionSet):
    """2,000 Alpaca records (mhenrichsen/alpaca_2k_test): quick fine-tuning experiments."""

    source: ClassVar[HubFile] = HubFile("mhenrichsen/alpaca_2k_test", "default/train/0000.parquet", PARQUET_REVISION)
    download_dir: Path = Path("data/alpaca2k")
    """Where the data file is downloaded (and read from on later runs)."""
    val_split_fraction: float = 0.05
    """Fraction held out for validation (0.05 gives 100 records)."""


@dataclass(kw_only=True)
class AlpacaGPT4(HubInstructionSet):
    """The Alpaca instructions answered by GPT-4 (vicgalle/alpaca-gpt4): 52,002 records."""

    source: ClassVar[HubFile] = HubFile("vicgalle/alpaca-gpt4", "default/train/0000.parquet", PARQUET_REVISION)
    download_dir: Path = Path("data/alpacagpt4")
    """Where the data file is downloaded (and read from on later runs)."""
    val_split_fraction: float = 0.03865
    """Fraction held out for validation."""


@dataclass(kw_only=True)
class Dolly(HubInstructionSet):
    """Databricks Dolly 15k: human-written instruction/context/response records."""

    source: ClassVar[HubFile] = HubFile("databricks/databricks-dolly-15k", "databricks-dolly-15k.jsonl")
    download_dir: Path = Path("data/dolly")
    """Where the data file is downloaded (and read from on later runs)."""
    val_split_fraction: float = 0.1
    """Fraction held out for validation."""

    def convert(self, raw: Any, origin: str) -> list[Record]:
        if not isinstance(raw, dict) or "response" not in raw:
            raise LitLLMError(f"{origin}: expected a Dolly record with 'instruction', 'context' and 'response'")
        renamed = {"instruction": raw.get("instruction"), "input": raw.get("context") or "", "output": raw["response"]}
        return [parse_record(renamed, origin)]


@dataclass(kw_only=True)
class LIMA(HubInstructionSet):
    """LIMA (GAIR/lima, gated): 1,030 curated conversations, alternating user and assistant turns."""

    source: ClassVar[HubFile] = HubFile("GAIR/lima", "train.jsonl")
    download_dir: Path = Path("data/lima")
    """Where the data file is downloaded (and read from on later runs)."""
    val_split_fraction: float = 0.1
    """Fraction held out for validation."""
    include_multiturn_conversations: bool = False
    """Train on whole multi-turn conversations (every assistant turn). Otherwise each record's first
    question and answer only."""

    def convert(self, raw: Any, origin: str) -> list[Record]:
        turns = raw.get("conversations") if isinstance(raw, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            raise LitLLMError(f"{origin}: expected 'conversations', a list of at least a question and an answer")
        if not self.include_multiturn_conversations:
            return [parse_record({"instruction": turns[0], "input": "", "output": turns[1]}, origin)]
        roles = ("user", "assistant")
        messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
        return [parse_record({"messages": messages}, origin)]
