"""Packed SFT batches (`--data.packing true`) against the invariant packed == unpacked.

Every label token's log-probability, and the gradients of their sum, are those of the same samples run
one by one (fp32, within 1e-5) for full, LoRA and adapter models, also with sliding windows and
softcapping; validation on packed data gives the unpacked loss; an epoch is every sample once and the
step budget counts rows; a packed LoRA run resumes bit-exactly.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_resumed_run_is_uninterrupted, json_file, tiny_config
from litllm.adapter import add_adapter_v2
from litllm.config import Config
from litllm.data import JSON
from litllm.data.sft import PackedDataset, PadCollate, pack_samples
from litllm.losses import token_logprobs
from litllm.lora import add_lora
from litllm.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 320


def random_samples(n: int = 9, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (), generator=g))
        labels = torch.randint(0, VOCAB, (length,), generator=g)
        labels[: int(torch.randint(0, length - 1, (), generator=g))] = -100  # a masked prompt
        samples.append({"input_ids": torch.randint(0, VOCAB, (length,), generator=g), "labels": labels})
    return samples


# ---------------------------------------------------------------------- the packing itself
def test_best_fit_decreasing_places_every_sample_once_within_the_rows():
    lengths = [int(x) for x in torch.randint(1, 40, (200,), generator=torch.Generator().manual_seed(3))]
    rows = pack_samples(lengths, 48)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 48 for row in rows)
    assert len(rows) <= math.ceil(sum(lengths) / 48) * 11 / 9 + 1  # BFD's bound, far below one row per sample
    assert pack_samples(lengths, 48) == rows  # deterministic
    assert pack_samples([5, 3, 4, 4], 8) == [[0, 1], [2, 3]]  # longest first, tightest fit
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        pack_samples([2, 9], 8)


def test_rows_restart_positions_and_keep_each_samples_labels():
    samples = random_samples()
    dataset = PackedDataset(samples, 32)
    for index, row in enumerate(dataset.rows):
        packed = dataset[index]
        at = 0
        for d, i in enumerate(row):
            n = len(samples[i]["input_ids"])
            assert torch.equal(packed["input_ids"][at : at + n], samples[i]["input_ids"])
            # the last token of a sample predicts that sample's last target, never the next sample's first token
            assert torch.equal(packed["labels"][at : at + n], samples[i]["labels"])
            assert torch.equal(packed["input_pos"][at : at + n], torch.arange(n))
            assert (packed["document_ids"][at : at + n] == d).all()
            at += n
    batch = PadCollate(pad_id=7, ignore_index=-100)([dataset[0], dataset[len(dataset) - 1]])
    short = len(dataset[len(dataset) - 1]["input_ids"])
    assert (batch["document_ids"][1, short:] == -1).all() and (batch["labels"][1, short:] == -100).all()


# ---------------------------------------------------------------------- packed == unpacked
def make_model(kind: str, config: Config) -> GPT:
    torch.manual_seed(0)
    model = GPT(config)
    model.reset_parameters()
    if kind == "lora":
        add_lora(model, r=4, alpha=8, dropout=0.0, query=True, key=True, value=True, projection=True, mlp=True)
    elif kind == "adapter":
        add_adapter_v2(model, adapter_start_layer=1, prefix_length=5)
    with torch.no_grad():  # LoRA's B and the adapter gates start at zero: give them a value to test
        for name, p in model.named_parameters():
            if name.endswith("lora_B") or name.endswith(".gate"):
                p.normal_(0, 0.5)
    return model


def per_sample_logprobs_and_grads(model, samples):
    model.zero_grad()
    logprobs = []
    for s in samples:
        lp = token_logprobs(torch.nn.Identity(), model(s["input_ids"][None]), s["labels"][None])[0]
        lp.sum().backward()
        logprobs.append(lp.detach())
    return logprobs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_logprobs_and_grads(model, samples, row_length: int):
    dataset = PackedDataset(samples, row_length)
    batch = PadCollate(pad_id=0)([dataset[i] for i in range(len(dataset))])
    model.zero_grad()
    logits = model(batch["input_ids"], input_pos=batch["input_pos"], document_ids=batch["document_ids"])
    lp = token_logprobs(torch.nn.Identity(), logits, batch["labels"])  # (rows, T)
    lp.sum().backward()
    by_sample = {}
    for r, row in enumerate(dataset.rows):
        at = 0
        for i in row:
            n = len(samples[i]["input_ids"])
            by_sample[i] = lp[r, at : at + n].detach()
            at += n
    assert len(dataset) < len(samples)  # rows really hold several samples
    return [by_sample[i] for i in range(len(samples))], {n: p.grad.clone() for n, p in model.named_parameters()
                                                          if p.grad is not None}


CONFIGS = {
    "llama": {},
    # Gemma-2-like: local layers with a window shorter than a sample, and softcapped scores and logits
    "window_softcap": dict(sliding_window_size=6, sliding_window_period=2, attention_logit_softcapping=5.0,
                           final_logit_softcapping=3.0, rope_local_base=1000.0),
}


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["full", "lora", "adapter"])
def test_packed_rows_give_every_tokens_unpacked_loss_and_gradients(kind, config_name):
    config = tiny_config(**CONFIGS[config_name])
    model = make_model(kind, config)
    samples = random_samples()
    want, want_grads = per_sample_logprobs_and_grads(model, samples)
    got, got_grads = packed_logprobs_and_grads(model, samples, row_length=40)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (torch.cat(want) != 0).sum() > 20
    assert set(got_grads) == set(want_grads) and len(got_grads) > 0
    for name, want_grad in want_grads.items():
        # sums over every token in another order: equal to fp32 rounding, 1e-5 of the gradient's scale
        scale = max(1.0, want_grad.abs().max().item())
        torch.testing.assert_close(got_grads[name], want_grad, atol=1e-5 * scale, rtol=0, msg=name)


def test_without_document_ids_the_samples_would_leak():
    """The invariant above can fail: plain causal attention over a packed row changes later samples' losses."""
    model = make_model("full", tiny_config())
    samples = random_samples()
    dataset = PackedDataset(samples, 40)
    row = next(r for r in range(len(dataset)) if len(dataset.rows[r]) > 1)
    batch = PadCollate()([dataset[row]])
    blocked = model(batch["input_ids"], input_pos=batch["input_pos"], document_ids=batch["document_ids"])
    leaky = model(batch["input_ids"], input_pos=batch["input_pos"])
    second = batch["document_ids"][0] == 1
    assert not torch.allclose(blocked[0, second], leaky[0, second], atol=1e-3)
    with pytest.raises(ValueError, match="KV cache"):
        model.set_kv_cache(1)
        model(batch["input_ids"], input_pos=batch["input_pos"], document_ids=batch["document_ids"])


# ---------------------------------------------------------------------- the data modules and the loop
def _records(n: int = 40) -> list[dict]:
    return [{"instruction": f"Say the number {i}" + " please" * (i % 7), "output": f"The number is {i}." * (1 + i % 3)}
            for i in range(n)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return json_file(tmp_path_factory, _records())


def _data(data_file: Path, packing: bool) -> JSON:
    return JSON(json_path=data_file, val_split_fraction=0.2, prompt_style="default", packing=packing)


def test_json_module_packs_train_and_val_and_reports_it(base, data_file, capsys):
    from litllm.tokenizer import Tokenizer

    data = _data(data_file, packing=True)
    data.connect(Tokenizer(base), batch_size=2, max_seq_length=128)
    data.setup()
    out = capsys.readouterr().out
    train = data.train_dataloader()
    val = data.val_dataloader()
    out = capsys.readouterr().out
    assert "JSON train: packed 32 samples into" in out and "JSON val: packed 8 samples into" in out
    assert "fill" in out and "saves" in out
    rows = train.dataset.rows
    assert sorted(i for row in rows for i in row) == list(range(32))  # an epoch: every sample once
    assert len(train) == math.ceil(len(rows) / 2) and len(rows) < 32 * 0.6
    batch = next(iter(val))
    assert set(batch) == {"input_ids", "labels", "input_pos", "document_ids"} and batch["input_ids"].size(1) <= 128
    # the sample the validation hook continues is still a sample, not a row
    assert data.val_dataset[0]["input_ids"].shape == data.val_dataset.samples[0]["input_ids"].shape


def test_validation_on_packed_data_gives_the_unpacked_loss(base, data_file):
    from litllm.tokenizer import Tokenizer
    from litllm.train.fabric import make_fabric
    from litllm.train.loop import validate

    fabric = make_fabric(accelerator="cpu", devices=1, precision="32-true")
    model = GPT.from_checkpoint(base)
    losses = {}
    for packing in (False, True):
        data = _data(data_file, packing)
        data.connect(Tokenizer(base), batch_size=3, max_seq_length=128)
        data.setup()
        losses[packing] = validate(fabric, model, data.val_dataloader(), 100, data.ignore_index)["loss"]
    assert math.isfinite(losses[True])
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_packed_lora_run_counts_rows_validates_and_resumes_bit_exactly(base, data_file, tmp_path, capsys):
    from litllm.finetune import finetune_lora
    from litllm.train.args import EvalArgs, TrainArgs

    def run(out, resume=False, **train):
        args = dict(global_batch_size=4, micro_batch_size=2, max_steps=None, epochs=2, lr_warmup_steps=1,
                    save_interval=2, max_seq_length=128)
        args.update(train)
        return finetune_lora(
            base, out_dir=out, accelerator="cpu", precision="32-true", data=_data(data_file, packing=True),
            train=TrainArgs(**args), eval=EvalArgs(interval=3, max_iters=2),
            optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-2, "weight_decay": 0.0}},
            lora_dropout=0.1, lora_mlp=True, resume=resume,
        )

    straight = run(tmp_path / "straight")
    out = capsys.readouterr().out
    rows = int(out.split("JSON train: packed 32 samples into ")[1].split()[0])
    assert straight.step == 2 * math.ceil(rows / 2) // 2  # two epochs of rows, 2 micro-batches per step
    assert "= 4 packed rows of up to 128 tokens per step" in out  # the batch counts rows, and says so
    assert straight.step >= 3 and math.isfinite(straight.val_loss) and straight.val_losses
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copytree(tmp_path / "straight" / "step-00000002", resumed_out / "step-00000002")
    resumed = run(resumed_out, resume="auto")
    assert (resumed_out / "final" / "lit_lora.safetensors").is_file()
    assert_resumed_run_is_uninterrupted(resumed_out, resumed, tmp_path / "straight", straight, first_step=3)


def test_unset_max_seq_length_packs_rows_of_the_longest_sample(base, data_file, tmp_path, capsys):
    from litllm.finetune import finetune_full
    from litllm.train.args import EvalArgs, TrainArgs

    finetune_full(
        base, out_dir=tmp_path, accelerator="cpu", precision="32-true", data=_data(data_file, packing=True),
        train=TrainArgs(global_batch_size=2, micro_batch_size=2, max_steps=1, save_interval=None, max_seq_length=None),
        eval=EvalArgs(interval=100, max_iters=1, final_validation=False),
    )
    out = capsys.readouterr().out
    longest = int(out.split("--train.max_seq_length unset: using ")[1].split(",")[0])
    assert f"into {int(out.split('JSON train: packed 32 samples into ')[1].split()[0])} rows of {longest} tokens" in out


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_flex_attention_path_matches_the_masked_path(config_name, monkeypatch):
    """The CUDA path (FlexAttention BlockMask), run eagerly on the CPU (forward only: FlexAttention has no
    CPU backward), against the boolean-mask SDPA path: windows, softcapping and GQA included."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import litllm.model

    model = make_model("full", tiny_config(**CONFIGS[config_name]))
    dataset = PackedDataset(random_samples(), 40)
    batch = PadCollate()([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        want = model(batch["input_ids"], input_pos=batch["input_pos"], document_ids=batch["document_ids"])
        monkeypatch.setattr(litllm.model, "use_flex_attention", lambda device: True)
        masks = model._attention_masks(batch["input_ids"].size(1), torch.device("cpu"), None, None, None,
                                       batch["document_ids"])
        assert not isinstance(masks[False], torch.Tensor)  # the BlockMask path really runs
        got = model(batch["input_ids"], input_pos=batch["input_pos"], document_ids=batch["document_ids"])
    real = batch["document_ids"] >= 0
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def test_every_sft_data_module_takes_the_packing_flag():
    import dataclasses

    from litllm.data import LIMA, Alpaca, Alpaca2k, AlpacaGPT4, Dolly

    for module in (JSON, Alpaca, Alpaca2k, AlpacaGPT4, Dolly, LIMA):
        field = {f.name: f for f in dataclasses.fields(module)}["packing"]
        assert field.default is False and field.init, module
