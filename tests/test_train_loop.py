"""The shared training loop (litllm.train): loss normalisation, accumulation, methods, resume, schedule, FLOPs."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import pytest
import torch

import conftest
from litllm.config import Config
from litllm.data.base import DataModule
from litllm.errors import LitLLMError
from litllm.model import GPT
from litllm.train.args import EvalArgs, RunArgs, TrainArgs
from litllm.train.loop import Method, fit, setup

VOCAB = 320


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides):
    return conftest.tiny_config(**{"block_size": 32, "n_layer": 2, **overrides})


@dataclass
class FixedTokens(DataModule):
    """Random token rows as a map-style dataset (also used by the multi-process tests via --data).

    With `pad_every` > 0, every such row has its last `pad_tokens` labels set to -100 (as padded
    finetuning batches do), so rows carry different numbers of label tokens.
    """

    n_train: int = 64
    n_val: int = 16
    seq_length: int = 16
    seed: int = 0
    shuffle: bool = False
    pad_every: int = 0
    pad_tokens: int = 10

    def setup(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        T = self.seq_length if self.max_seq_length in (None, -1) else min(self.seq_length, self.max_seq_length)
        rows = torch.randint(0, VOCAB, (self.n_train + self.n_val, T + 1), generator=g)
        self.samples = []
        for i, row in enumerate(rows):
            labels = row[1:].clone()
            if self.pad_every and i % self.pad_every == 0:
                labels[-self.pad_tokens:] = -100
            self.samples.append({"input_ids": row[:-1], "labels": labels})

    def _loader(self, samples, shuffle):
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return torch.utils.data.DataLoader(samples, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self):
        return self._loader(self.samples[: self.n_train], self.shuffle)

    def val_dataloader(self):
        return self._loader(self.samples[self.n_train:], False)


def single_fabric():
    from litllm.train.fabric import make_fabric

    fabric = make_fabric(devices=1, accelerator="cpu", precision="32-true")
    fabric.launch()
    return fabric


@pytest.fixture(scope="module")
def fabric():
    return single_fabric()


def fresh_model(config: Config, seed: int = 1) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    model.reset_parameters()
    return model


def train_once(fabric, out_dir, *, data=None, method=None, resume=False, config=None, run_kwargs=None, **train_kwargs):
    config = config or tiny_config()
    defaults = dict(global_batch_size=8, micro_batch_size=4, max_steps=6, save_interval=None, lr_warmup_steps=2, min_lr=1e-4)
    defaults.update(train_kwargs)
    return fit(setup(
        fabric, fresh_model(config), method or Method(), data or FixedTokens(), None, TrainArgs(**defaults),
        EvalArgs(interval=100, max_iters=2, final_validation=False), {"class_path": "AdamW", "init_args": {"lr": 3e-3}},
        out_dir, RunArgs(seed=7, resume=resume, **(run_kwargs or {})),
    ))


def test_loss_falls_and_final_folder_is_a_model(fabric, tmp_path):
    result = train_once(fabric, tmp_path, max_steps=12, data=FixedTokens(n_train=16))
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[-1] < losses[0] - 0.5
    model = GPT.from_checkpoint(tmp_path / "final")
    assert model.config == tiny_config()
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


@pytest.mark.parametrize("micro_batch_size", [1, 2, 8])
def test_accumulation_splits_give_the_same_steps(fabric, tmp_path, micro_batch_size):
    """Padded rows make micro-batches hold different label-token counts: the global token mean must not care."""
    data = FixedTokens(pad_every=3)
    reference = train_once(fabric, tmp_path / "ref", data=data, micro_batch_size=4, max_steps=4)
    other = train_once(fabric, tmp_path / "other", data=FixedTokens(pad_every=3), micro_batch_size=micro_batch_size, max_steps=4)
    for step, loss in reference.losses.items():
        assert other.losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)


def test_activation_checkpointing_changes_nothing_but_memory(fabric, tmp_path):
    plain = train_once(fabric, tmp_path / "plain", max_steps=3)
    checkpointed = train_once(fabric, tmp_path / "ac", max_steps=3, run_kwargs={"activation_checkpointing": True})
    for step, loss in plain.losses.items():
        assert checkpointed.losses[step] == pytest.approx(loss, rel=1e-6)
    # the saved names are the model's own (no wrapper prefixes), so the folder loads as a plain GPT
    GPT.from_checkpoint(tmp_path / "ac" / "final")


def test_loss_is_the_global_token_mean(fabric, tmp_path):
    """Step 1's reported loss equals the token-mean loss of the initial model over the whole global batch."""
    data = FixedTokens(pad_every=2)
    result = train_once(fabric, tmp_path, data=data, micro_batch_size=2, max_steps=1)
    data.connect(None, batch_size=8, max_seq_length=16)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    model = fresh_model(tiny_config())
    expected = torch.nn.functional.cross_entropy(
        model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
    )
    assert result.losses[1] == pytest.approx(expected.item(), rel=1e-5)


def test_resume_is_bit_identical_and_crosses_epochs(fabric, tmp_path):
    data = dict(n_train=24, shuffle=True)  # 3 steps per epoch: the resume lands mid-epoch
    straight = train_once(fabric, tmp_path / "straight", data=FixedTokens(**data), max_steps=8)
    half = train_once(fabric, tmp_path / "split", data=FixedTokens(**data), max_steps=8, save_interval=4)
    assert (tmp_path / "split" / "step-00000004" / "training_state.pt").is_file()
    import shutil

    shutil.rmtree(tmp_path / "split" / "step-00000008")
    shutil.rmtree(tmp_path / "split" / "final")
    resumed = train_once(fabric, tmp_path / "split", data=FixedTokens(**data), max_steps=8, save_interval=4, resume="auto")
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for step in range(1, 9):
        assert half.losses[step] == straight.losses[step]
    for step in range(5, 9):
        assert resumed.losses[step] == straight.losses[step]  # bit-identical on CPU


def test_method_trains_only_selected_parameters_and_resumes(fabric, tmp_path):
    """A method that trains only the norms: frozen weights stay, checkpoints hold only the trained ones."""
    method = Method(name="norms", trainable=lambda name, p: "norm" in name)
    config = tiny_config()
    initial = fresh_model(config).state_dict()
    result = train_once(fabric, tmp_path, method=method, max_steps=4, save_interval=2)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "step-00000002" / "trainable.safetensors"))
    assert saved and all("norm" in k for k in saved)
    assert not (tmp_path / "step-00000002" / "lit_model.safetensors").exists()
    final = load_file(str(tmp_path / "final" / "lit_model.safetensors"))
    assert torch.equal(final["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    assert not torch.equal(final["blocks.0.norm_1.weight"], initial["blocks.0.norm_1.weight"])
    assert result.step == 4


def test_export_decides_the_final_weights(fabric, tmp_path):
    def export(sd):
        return {k: torch.zeros_like(v) if k == "norm_f.weight" else v for k, v in sd.items()}

    train_once(fabric, tmp_path, method=Method(export=export), max_steps=1)
    model = GPT.from_checkpoint(tmp_path / "final")
    assert torch.count_nonzero(model.norm_f.weight) == 0


def test_bad_inputs(fabric, tmp_path):
    with pytest.raises(LitLLMError, match="divisible"):
        train_once(fabric, tmp_path, global_batch_size=6, micro_batch_size=4)
    with pytest.raises(LitLLMError, match="another model shape"):
        train_once(fabric, tmp_path, max_steps=1, save_interval=1)
        train_once(fabric, tmp_path, config=tiny_config(n_layer=3), max_steps=2, resume="auto")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(LitLLMError, match="no batch"):
        train_once(fabric, tmp_path, data=FixedTokens(n_train=0), resume="auto")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(LitLLMError, match="not a training checkpoint"):
        train_once(fabric, tmp_path / "x", resume=tmp_path / "final")
    with pytest.raises(LitLLMError, match=r"step-00000009: not found \(.* holds step-00000001\)"):
        train_once(fabric, tmp_path / "x", resume=tmp_path / "step-00000009")



def test_a_run_that_fails_before_its_first_step_leaves_no_output(fabric, tmp_path):
    """A fresh run whose first step raises (a GRPO reward function that fails) leaves nothing behind: the logs it
    started are removed, and its out_dir where the run made it; what the folder held before stays, and so does what
    another program wrote there meanwhile (out_dir may be `.`)."""
    from litllm.train.loggers import build_logger

    def failing_loss(model, batch, ignore_index):
        raise ValueError("no loss today")

    kept = tmp_path / "mine" / "notes.txt"
    kept.parent.mkdir()
    kept.write_text("mine")
    for out_dir in (tmp_path / "new", kept.parent):
        trainer = setup(
            fabric, fresh_model(tiny_config()), Method(loss=failing_loss), FixedTokens(), None,
            TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=2), EvalArgs(interval=100, max_iters=1),
            "AdamW", out_dir, RunArgs(seed=7), logger=build_logger("csv", out_dir),
        )
        assert (out_dir / "logs" / "csv" / "hparams.json").is_file()  # the run had started writing
        if out_dir == kept.parent:
            (out_dir / "meanwhile.txt").write_text("not the run's")
        with pytest.raises(ValueError, match="no loss today"):
            fit(trainer)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in kept.parent.iterdir()) == ["meanwhile.txt", "notes.txt"] and kept.read_text() == "mine"

def test_train_args_budget():
    args = TrainArgs(global_batch_size=8, micro_batch_size=2, max_tokens=8 * 16 * 10, lr_warmup_fraction=0.2, lr_warmup_steps=None)
    assert args.gradient_accumulation_iters(world_size=2) == 2
    assert args.total_steps(seq_length=16, batches_per_epoch=None, accumulation=2) == 10
    assert args.warmup_steps(10) == 2
    assert TrainArgs(epochs=2).total_steps(16, batches_per_epoch=10, accumulation=4) == 5
    assert TrainArgs().total_steps(16, batches_per_epoch=10, accumulation=2) == 5  # one epoch by default
    with pytest.raises(LitLLMError):
        TrainArgs(micro_batch_size=0)


def test_schedule():
    from litllm.train.schedule import lr_at

    lrs = [lr_at(s, max_lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # decays monotonically
    mid = lr_at(4 + 15 // 2, 1.0, 0.1, 4, 20)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))


def test_optimizer_specs():
    from litllm.train.optimizer import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "momentum": 0.9}}, params)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    adamw = build_optimizer({"class_path": "AdamW", "init_args": {"betas": [0.9, 0.95]}}, params)
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95) and adamw.param_groups[0]["fused"]  # one kernel on CPUs
    # the fused step is AdamW's: the same parameters as torch's reference (for-loop) implementation
    ref = torch.nn.Parameter(torch.randn(5, 3))
    fused = build_optimizer("AdamW", [torch.nn.Parameter(ref.detach().clone())])
    plain = torch.optim.AdamW([ref], foreach=False)
    for _ in range(3):
        for opt in (fused, plain):
            opt.param_groups[0]["params"][0].grad = torch.ones(5, 3)
            opt.step()
    torch.testing.assert_close(fused.param_groups[0]["params"][0], ref)
    with pytest.raises(LitLLMError, match="not an optimizer"):
        build_optimizer("Adamm", params)
    with pytest.raises(LitLLMError, match="no argument"):
        build_optimizer({"class_path": "SGD", "init_args": {"lr": 1, "betas": [0.9, 0.9]}}, params)


@pytest.mark.parametrize("tie", [False, True])
def test_flops_formula_matches_flop_counter(tie):
    """6N + 12·L·H·Q·T per token against torch's FlopCounterMode (which counts matmuls and attention)."""
    from litllm.train.flops import flops_per_token, measured_flops

    config = tiny_config(tie_embeddings=tie, n_embd=64, intermediate_size=128)
    model = GPT(config)
    B, T = 2, 32
    x = torch.randint(0, VOCAB, (B, T))
    counted = measured_flops(model, x, x)
    formula = flops_per_token(config, T) * B * T
    # FlopCounterMode counts matmuls only, as the formula does (norms, softmax, RoPE are left out)
    assert counted == pytest.approx(formula, rel=1e-3)
    frozen = flops_per_token(config, T, trainable_fraction=0.0)
    assert frozen < flops_per_token(config, T)


def test_csv_logger_keeps_history_across_resume(tmp_path):
    from litllm.train.loggers import CSVLogger

    log = CSVLogger(tmp_path)
    for step in (1, 2, 3):
        log.log_metrics({"loss": float(step)}, step)
    log.log_metrics({"val_loss": 9.0}, 3)
    resumed = CSVLogger(tmp_path)  # a run resumed from step 2 replays step 3
    resumed.log_metrics({"loss": 30.0}, 3)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "1.0"), ("2", "2.0"), ("3", "30.0")]
    fresh = CSVLogger(tmp_path)  # a fresh run starts over
    fresh.log_metrics({"loss": 5.0}, 1)
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1


def test_tensorboard_and_unknown_logger(tmp_path):
    from litllm.train.loggers import build_logger

    logger = build_logger("tensorboard", tmp_path, "run")
    assert not (tmp_path / "logs").exists()  # nothing until the first metrics
    logger.log_metrics({"loss": 1.0}, 1)
    logger.finalize("success")
    assert list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(LitLLMError, match="logger_name"):
        build_logger("neptune", tmp_path, "run")


@pytest.mark.slow
def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from litllm.train.loggers import build_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = build_logger("wandb", tmp_path, "run")
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"loss": 2.0}, 1)
    logger.finalize()
    runs = list((tmp_path / "logs" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
