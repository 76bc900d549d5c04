"""`litllm finetune_dpo` and the `Preference` data module on a tiny converted model (CPU, fp32, in-process).

Data: the three record shapes give the same tokens; only reply tokens are targets; bad records name
file and index; long pairs are truncated prompt-first, skipped or refused. Command: LoRA, QLoRA and
full runs raise the reward margin, start at ln 2, log TRL's metric names; resume is bit-exact (LoRA
with dropout; full with precomputed reference log-probs, whose cache is reused); precomputed and
frozen-copy references give the same run; final/ generates and converts to a HF folder.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_final_folder_generates_and_matches_hf, assert_resumed_run_is_uninterrupted, json_file
from litllm.data.preference import Preference, PreferenceRecord, parse_preference_record, tokenize_pairs
from litllm.errors import LitLLMError
from litllm.finetune import finetune_dpo
from litllm.model import GPT
from litllm.train.args import EvalArgs, TrainArgs

ROOT = Path(__file__).resolve().parents[1]


def _pairs(n: int = 40) -> list[dict]:
    return [{"prompt": f"Say the number {i}", "chosen": f"The number is {i}.", "rejected": f"No, {i + 1}!"}
            for i in range(n)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return json_file(tmp_path_factory, _pairs(), "pairs.json")


def _tokenizer(base):
    from litllm.tokenizer import Tokenizer

    return Tokenizer(base)


def _module(path: Path, tokenizer, max_seq_length: int = 127, **kwargs) -> Preference:
    data = Preference(json_path=path, val_split_fraction=0.0, **kwargs)
    data.connect(tokenizer, batch_size=2, max_seq_length=max_seq_length)
    data.setup()
    return data


# ---------------------------------------------------------------------- data
def test_string_chat_and_sharegpt_records_give_the_same_tokens(base, tmp_path):
    prompt, chosen, rejected = "Say the number 7", "The number is 7.", "No."
    system = {"role": "system", "content": "Be brief."}
    earlier = [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": prompt}]
    shapes = {
        "chat": {"chosen": earlier + [{"role": "assistant", "content": chosen}],
                 "rejected": earlier + [{"role": "assistant", "content": rejected}]},
        "explicit": {"prompt": earlier, "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]},
        "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": prompt}],
                     "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}},
    }
    tokenizer = _tokenizer(base)
    samples = {}
    for name, record in shapes.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        samples[name] = _module(path, tokenizer, prompt_style="chatml").train_dataset[0]
    for name in ("explicit", "sharegpt"):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert torch.equal(samples[name][key], samples["chat"][key]), (name, key)
    decoded = tokenizer.decode(samples["chat"]["prompt_ids"])
    assert "Hello!" in decoded and decoded.endswith(f"user\n{prompt}\nassistant\n")  # earlier turns are prompt
    assert tokenizer.decode(samples["chat"]["chosen_ids"]).startswith(chosen)
    # a plain-string record is encoded as SFT encodes an instruction record: the style's prompt, reply + EOS
    path = tmp_path / "strings.json"
    path.write_text(json.dumps([{"prompt": prompt, "chosen": chosen, "rejected": rejected}]))
    single = _module(path, tokenizer, prompt_style="chatml").train_dataset[0]
    assert tokenizer.decode(single["prompt_ids"]).endswith(f"user\n{prompt}\nassistant\n")
    assert tokenizer.decode(single["chosen_ids"]) == chosen and single["chosen_ids"][-1] == tokenizer.eos_id


def test_batch_is_chosen_rows_then_rejected_rows_and_only_replies_count(base, pairs_file):
    data = _module(pairs_file, _tokenizer(base), prompt_style="default")
    samples = [data.train_dataset[i] for i in range(3)]
    batch = data.collate()(samples)
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].shape == batch["input_ids"].shape
    for row, (sample, key) in enumerate([(s, "chosen_ids") for s in samples] + [(s, "rejected_ids") for s in samples]):
        reply = sample[key]
        tokens = torch.cat([sample["prompt_ids"], reply])
        n = len(tokens) - 1
        assert torch.equal(batch["input_ids"][row, :n], tokens[:-1])
        assert torch.equal(batch["labels"][row][batch["labels"][row] != -100], reply)  # the reply, nothing else
        assert (batch["labels"][row, n:] == -100).all()
        assert torch.equal(batch["labels"][row, :n][len(sample["prompt_ids"]) - 1:], reply)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "a"}, "record 1: missing key 'rejected'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "record 1: 'chosen' and 'rejected' are the same"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "record 1: 'prompt' must be a string"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
     "record 1: 'chosen' and 'rejected' must share every message"),
    ({"conversations": [{"from": "robot", "value": "x"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, r"record 1: conversations\[0\]: 'from' must be one of"),
    ({"conversations": [{"from": "human", "value": "x"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "a"}}, "record 1: 'chosen' and 'rejected' are the same"),
])
def test_bad_records_name_the_file_and_index(base, tmp_path, record, message):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([_pairs(1)[0], record]))
    with pytest.raises(LitLLMError, match=f"{path} {message}"):
        _module(path, _tokenizer(base), prompt_style="default")


def test_long_pairs_truncate_prompt_first_skip_or_error(base, capsys):
    from litllm.prompts import PromptStyle

    tokenizer, style = _tokenizer(base), PromptStyle.from_name("default")
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    records = [PreferenceRecord("f record 0", prompt=long_prompt, chosen="Pack my box.", rejected="No.")]
    whole = tokenize_pairs(records, tokenizer, style, max_seq_length=1000)[0]
    limit = len(whole["chosen_ids"]) + 10  # fits the longer reply and 10 prompt tokens
    cut = tokenize_pairs(records, tokenizer, style, max_seq_length=limit - 1)[0]
    assert torch.equal(cut["chosen_ids"], whole["chosen_ids"]) and torch.equal(cut["rejected_ids"], whole["rejected_ids"])
    assert torch.equal(cut["prompt_ids"], whole["prompt_ids"][-10:])  # the prompt's end, next to the reply, stays
    assert tokenize_pairs(records, tokenizer, style, max_seq_length=limit - 1, long_pairs="skip", name="P") == []
    with pytest.raises(LitLLMError, match="f record 0: .* tokens"):
        tokenize_pairs(records, tokenizer, style, max_seq_length=limit - 1, long_pairs="error")
    same_ends = [PreferenceRecord("f record 1", prompt=long_prompt, chosen="Pack my box.", rejected="Pack my bag.")]
    assert tokenize_pairs(same_ends, tokenizer, style, max_seq_length=2, name="Q") == []  # replies cut to 2 tokens
    assert capsys.readouterr().out.splitlines()[-2:] == [  # one line per call that met a long pair
        f"P: 1 of 1 pairs are longer than max_seq_length + 1 = {limit} tokens: 1 skipped",
        "Q: 1 of 1 pairs are longer than max_seq_length + 1 = 3 tokens: 1 dropped (the truncated replies were identical)"]
    with pytest.raises(LitLLMError, match="long_pairs must be truncate, skip or error, got 'cut'"):
        tokenize_pairs(records, tokenizer, style, max_seq_length=limit - 1, long_pairs="cut")


def test_shared_sharegpt_demo_parses(shared_data, base):
    raw = json.loads((shared_data / "dpo_en_demo.json").read_text())
    records = [parse_preference_record(r, f"dpo_en_demo.json record {i}") for i, r in enumerate(raw)]
    assert len(records) == len(raw) and all(r.messages and r.messages[-1]["role"] == "user" for r in records)


# ---------------------------------------------------------------------- the command
def _kwargs(pairs_file: Path, method: str = "lora", max_steps: int = 8, **extra) -> dict:
    kwargs = dict(
        method=method, accelerator="cpu", precision="32-true",
        data=Preference(json_path=pairs_file, prompt_style="default", val_split_fraction=0.1),
        train=TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=max_steps, lr_warmup_steps=1,
                        save_interval=2, max_seq_length=64),
        eval=EvalArgs(interval=4, max_iters=2),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2 if method == "lora" else 1e-3,
                                                                     "weight_decay": 0.0}},
    )
    kwargs.update(extra)
    return kwargs


def _metrics(out: Path) -> list[dict]:
    from litllm.train.loggers import read_csv_rows

    return read_csv_rows(out / "logs" / "csv" / "metrics.csv")


RUNS = {
    "lora": dict(lora_dropout=0.1, lora_mlp=True),
    "qlora": dict(quantize="bnb.nf4", lora_mlp=True),
    "full": {},
    "full_precomputed": dict(precompute_reference=True),
    "ipo_lora": dict(loss="ipo", lora_mlp=True),
    "simpo_lora": dict(loss="simpo", beta=2.0, lora_mlp=True),
}


@pytest.fixture(scope="module")
def runs(base, pairs_file, tmp_path_factory, one_thread) -> dict:
    results = {}
    for name, extra in RUNS.items():
        if "quantize" in extra and not _has_bnb():
            continue
        out = tmp_path_factory.mktemp(name)
        method = "full" if name.startswith("full") else "lora"
        results[name] = (out, finetune_dpo(base, out_dir=out, **_kwargs(pairs_file, method, **extra)))
    return results


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", list(RUNS))
def test_every_variant_learns_the_preference(runs, name):
    if name not in runs:
        pytest.skip("bitsandbytes not installed")
    out, result = runs[name]
    assert result.step == 8
    rows = [r for r in _metrics(out) if r.get("loss")]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "loss"} <= set(rows[0])
    losses = [float(r["loss"]) for r in rows]
    if not name.startswith(("ipo", "simpo")):
        # policy == reference at step 0, up to fp32 rounding: on the CPU the policy's forward (gradients on) runs
        # litllm's fused training kernels (`litllm.fused_norms`), the reference's (no gradients) the inference ones
        assert abs(losses[0] - math.log(2)) <= 1e-6
        assert abs(float(rows[0]["rewards/margins"])) <= 1e-5
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert float(rows[-1]["rewards/margins"]) > float(rows[0]["rewards/margins"])
    val = [r for r in _metrics(out) if r.get("val_rewards/accuracies")]
    assert val and 0 <= float(val[-1]["val_rewards/accuracies"]) <= 1


def test_precomputed_reference_equals_the_frozen_copy(runs):
    frozen, precomputed = runs["full"][1], runs["full_precomputed"][1]
    for step, loss in frozen.losses.items():
        assert abs(precomputed.losses[step] - loss) <= 1e-5, step
    assert (runs["full_precomputed"][0] / "reference_logps.safetensors").is_file()
    assert not (runs["full"][0] / "reference_logps.safetensors").exists()


def test_final_folder_generates_and_converts_to_hf(runs, tmp_path):
    pytest.importorskip("transformers")
    for name in ("lora", "full"):
        final = runs[name][1].final_dir
        assert (final / "prompt_style.yaml").is_file() and (final / "lit_model.safetensors").is_file()
        assert_final_folder_generates_and_matches_hf(final, tmp_path / name)
    assert (runs["lora"][1].final_dir / "lit_lora.safetensors").is_file()


@pytest.mark.parametrize("name", ["lora", "full_precomputed"])
def test_resume_is_bit_exact(runs, base, pairs_file, tmp_path, capsys, name):
    straight_out, straight = runs[name]
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copytree(straight_out / "step-00000004", resumed_out / "step-00000004")
    cache = straight_out / "reference_logps.safetensors"
    if cache.is_file():  # the run's cached reference log-probs travel with it and are reused
        shutil.copy(cache, resumed_out / cache.name)
    method = "full" if name.startswith("full") else "lora"
    capsys.readouterr()
    resumed = finetune_dpo(base, out_dir=resumed_out, resume="auto", **_kwargs(pairs_file, method, **RUNS[name]))
    if cache.is_file():
        assert "Reusing the reference log-probs" in capsys.readouterr().out
        assert load_file(str(resumed_out / cache.name)).keys() == load_file(str(cache)).keys()
    assert_resumed_run_is_uninterrupted(resumed_out, resumed, straight_out, straight, first_step=5)


def test_bad_arguments_fail_clearly_and_write_nothing(base, pairs_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LitLLMError, match="--data Preference"):
        finetune_dpo(base, out_dir=out, **dict(_kwargs(pairs_file), data=None))
    with pytest.raises(LitLLMError, match="--quantize needs --method lora"):
        finetune_dpo(base, out_dir=out, **_kwargs(pairs_file, "full", quantize="bnb.nf4"))
    with pytest.raises(LitLLMError, match="--beta"):
        finetune_dpo(base, out_dir=out, **_kwargs(pairs_file, beta=0.0))
    with pytest.raises(LitLLMError, match="--loss"):
        finetune_dpo(base, out_dir=out, **_kwargs(pairs_file, loss="kto"))
    assert not out.exists()


def test_cli_error_is_one_line(base, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "litllm", "finetune_dpo", str(base)], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--data Preference" in last and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- end to end, distributed
@pytest.mark.slow
def test_dpo_on_the_shared_demo_raises_held_out_reward_accuracy(shared_data, base, tmp_path, one_thread):
    """300 LoRA steps on dpo_en_demo.json (ShareGPT pairs, chat template): held-out reward accuracy > 0.5."""
    from litllm.train.loggers import read_csv_rows

    out = tmp_path / "out"
    finetune_dpo(
        base, out_dir=out, accelerator="cpu", precision="32-true", lora_r=16, lora_key=True, lora_projection=True,
        lora_mlp=True,
        data=Preference(json_path=shared_data / "dpo_en_demo.json", prompt_style="chatml", val_split_fraction=0.2),
        train=TrainArgs(global_batch_size=4, micro_batch_size=4, max_steps=300, lr_warmup_steps=10, save_interval=None,
                        max_seq_length=96),
        eval=EvalArgs(interval=100, max_iters=100, initial_validation=True),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "weight_decay": 0.0}},
    )
    val = [r for r in read_csv_rows(out / "logs" / "csv" / "metrics.csv") if r.get("val_rewards/accuracies")]
    assert float(val[0]["val_rewards/accuracies"]) == 0  # policy == reference: no pair is ranked yet
    assert float(val[-1]["val_rewards/accuracies"]) > 0.5, val[-1]
    assert float(val[-1]["val_rewards/margins"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_on_two_fsdp_processes(base, pairs_file, tmp_path, method):
    """LoRA (reference: adapters off on the sharded model) and full (precomputed reference) under FSDP2, 2 CPU processes."""
    import os

    from litllm.train.loggers import read_csv_rows

    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "litllm", "finetune_dpo", str(base), "--out_dir", str(out), "--method", method,
        "--accelerator", "cpu", "--devices", "2", "--strategy", "fsdp", "--precision", "32-true",
        "--data", "Preference", "--data.json_path", str(pairs_file), "--data.prompt_style", "default",
        "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "3",
        "--train.save_interval", "2", "--train.max_seq_length", "48", "--eval.interval", "100",
        "--optimizer.lr", "0.01" if method == "lora" else "0.001",
    ]
    if method == "full":
        args += ["--precompute_reference", "true"]
    proc = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=tmp_path,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_csv_rows(out / "logs" / "csv" / "metrics.csv") if r.get("loss")]
    # precomputed log-probs were scored in other batches (other padding), and the policy's forward runs the fused CPU
    # training kernels (`litllm.fused_norms`), the reference's the inference ones: equal up to rounding
    assert abs(float(rows[0]["loss"]) - math.log(2)) <= (1e-5 if method == "full" else 1e-6)
    assert float(rows[-1]["rewards/margins"]) > 0
    # the final folder is whole (gathered from the shards) and differs from the base
    x = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (GPT.from_checkpoint(out / "final").eval()(x) - GPT.from_checkpoint(base).eval()(x)).abs().max() > 1e-4
