"""Data modules for pretraining (`TextFiles`, `LitData`, `TinyLlama`) and fine-tuning (`JSON`, `Alpaca`,
`Alpaca2k`, `AlpacaGPT4`, `Dolly`, `LIMA`) and preference tuning (`Preference`) and RL (`Prompts`). See `litllm.data.base` for the contract with the training
loop and tutorials/data.md for the data formats.

Importing this package is cheap: litdata, huggingface_hub and pyarrow are imported when used.
"""

from litllm.data.base import DataModule
from litllm.data.instruction_sets import LIMA, Alpaca, Alpaca2k, AlpacaGPT4, Dolly
from litllm.data.json_data import JSON
from litllm.data.lit_data import LitData, TinyLlama
from litllm.data.preference import Preference
from litllm.data.prompts import Prompts
from litllm.data.sft import PadCollate, SFTDataModule, TokenizedDataset
from litllm.data.text_files import TextFiles

__all__ = [
    "DataModule",
    "TextFiles",
    "LitData",
    "TinyLlama",
    "SFTDataModule",
    "TokenizedDataset",
    "PadCollate",
    "JSON",
    "Alpaca",
    "Alpaca2k",
    "AlpacaGPT4",
    "Dolly",
    "LIMA",
    "Preference",
    "Prompts",
]
