"""Packed against padded SFT batches: real (non-pad) tokens trained per second, same model and budget.

    python benchmarks/finetune_packing.py                    # ../shared/data/alpaca_en_demo.json, CPU, fp32
    python benchmarks/finetune_packing.py --max_seq_length 1024 --micro_batch_size 4 --steps 40

Both sides tokenize the same records (a byte-level BPE tokenizer trained on them, Alpaca prompt
style) with the same `max_seq_length`, and train the same small Llama (fp32, AdamW) on micro-batches
of `micro_batch_size` x up to `max_seq_length` positions: padded batches of that many samples
(`JSON`, each batch padded to its longest sample), or that many packed rows (`--data.packing true`).
Each step is the project's own `train_step` (forward, the token-sum loss, backward, AdamW). The two
sides alternate step by step from the start of their epochs, so load from other processes hits both
alike. Reported: each side's padding fraction (of the positions it computed), the real tokens per
second, and the ratio. Skips (exit 0) when the data file is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


def train_tokenizer_on(records: list[dict], folder: Path, vocab_size: int) -> Path:
    from litllm.data.train_tokenizer import train_tokenizer

    text_dir = folder / "text"
    text_dir.mkdir()
    text = "\n".join(f"{r['instruction']}\n{r.get('input') or ''}\n{r['output']}" for r in records)
    (text_dir / "records.txt").write_text(text, encoding="utf-8")
    return train_tokenizer(str(text_dir), out_dir=folder / "tokenizer", vocab_size=vocab_size, glob="*.txt")


def build_model(vocab_size: int, args):
    from litllm.config import Config
    from litllm.model import GPT

    config = Config(
        name="bench-llama", block_size=args.max_seq_length, vocab_size=vocab_size, padding_multiple=64,
        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_query_groups=args.n_head,
        intermediate_size=args.n_embd * 4, norm_class_name="RMSNorm", mlp_class_name="GatedMLP", activation="silu",
    )
    torch.manual_seed(0)
    model = GPT(config)
    model.reset_parameters()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="micro-batches measured per side (after 2 warm-up)")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if not args.data.is_file():
        print(f"skipped: {args.data} not found")
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    from lightning_fabric import Fabric

    from litllm.data import JSON
    from litllm.tokenizer import Tokenizer
    from litllm.train.loop import train_step

    records = json.loads(args.data.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Tokenizer(train_tokenizer_on(records, Path(tmp), args.vocab_size))
        loaders = {}
        for name, packing in (("padded", False), ("packed", True)):
            data = JSON(json_path=args.data, val_split_fraction=0.0, prompt_style="alpaca", packing=packing)
            data.connect(tokenizer, batch_size=args.micro_batch_size, max_seq_length=args.max_seq_length)
            data.setup()
            loaders[name] = data.train_dataloader()
            loaders[name].collate_fn = counting(loaders[name].collate_fn)
        lengths = [len(s["input_ids"]) for s in data.train_dataset.samples]
    print(
        f"{len(lengths)} samples: mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)} tokens;"
        f" micro-batches of {args.micro_batch_size} x up to {args.max_seq_length} positions;"
        f" {args.n_layer}-layer Llama, n_embd {args.n_embd}, fp32, {torch.get_num_threads()} threads"
    )

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    sides = {}
    for name in loaders:
        model = build_model(tokenizer.vocab_size, args)
        model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
        sides[name] = {"model": model, "opt": optimizer, "batches": iter(loaders[name]), "time": 0.0, "real": 0,
                       "positions": 0, "steps": 0}
    for i in range(args.steps + 2):
        for name, side in sides.items():
            try:
                batch = next(side["batches"])
            except StopIteration:  # an epoch of packed rows is shorter: start it again
                side["batches"] = iter(loaders[name])
                batch = next(side["batches"])
            real = int(batch.pop("real_tokens"))
            start = time.perf_counter()
            train_step(fabric, side["model"], side["opt"], [batch], max_norm=1.0, ignore_index=-100)
            elapsed = time.perf_counter() - start
            if i < 2:  # warm-up
                continue
            side["time"] += elapsed
            side["steps"] += 1
            side["positions"] += batch["input_ids"].numel()
            side["real"] += real

    rates = {}
    for name, side in sides.items():
        rates[name] = side["real"] / side["time"]
        print(
            f"{name}: padding {1 - side['real'] / side['positions']:.1%} of {side['positions'] / side['steps']:.0f}"
            f" positions per micro-batch, {rates[name]:,.0f} real tokens/s ({side['time'] / side['steps'] * 1e3:.0f}"
            f" ms per micro-batch)"
        )
    print(f"packed / padded: {rates['packed'] / rates['padded']:.2f}x real tokens per second")


def counting(collate):
    """The collate function, adding `real_tokens`: the batch's sample tokens (its positions less its padding)."""

    def collate_and_count(items: list[dict]) -> dict:
        batch = collate(items)
        batch["real_tokens"] = torch.tensor(sum(len(item["input_ids"]) for item in items))
        return batch

    return collate_and_count


if __name__ == "__main__":
    main()
