"""The training seams other methods build on: Method.loss, batch keys, ignore_index, the per-token
log-probabilities, disable_adapters, and a train model that builds and steps under FakeTensorMode."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import litllm.losses
from litllm.losses import chunked_cross_entropy, linear_cross_entropy, token_logprobs
from litllm.model import GPT
from litllm.train.loop import Method, build_train_model, token_cross_entropy, train_step
from test_train_loop import FixedTokens, fresh_model, single_fabric, tiny_config, train_once

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fabric():
    return single_fabric()


# ---------------------------------------------------------------------- losses
def test_token_logprobs_match_log_softmax_and_chunked_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    x = torch.randn(3, 37, 16)
    targets = torch.randint(0, 50, (3, 37))
    targets[0, :5] = -1
    targets[2, 30:] = -1
    got = token_logprobs(head, x, targets, ignore_index=-1, chunk_size=8)
    expected = torch.log_softmax(head(x).float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = torch.where(targets == -1, torch.zeros_like(expected), expected)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert got.shape == (3, 37) and (got[targets == -1] == 0).all()
    mean = chunked_cross_entropy(head, x, targets, ignore_index=-1, chunk_size=8)
    torch.testing.assert_close(-got.sum() / (targets != -1).sum(), mean)
    reference = F.cross_entropy(head(x).flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(mean, reference)
    # logits that are already computed: the identity head
    torch.testing.assert_close(token_logprobs(torch.nn.Identity(), head(x), targets, ignore_index=-1), got)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_is_the_chunked_loss_with_its_backward_done_in_the_forward(bias, monkeypatch):
    monkeypatch.setattr(litllm.losses, "LINEAR_CE_ROWS", 8)  # 111 rows: 14 chunks, the last one short
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    x = torch.randn(3, 37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 37))
    targets[0, :5] = -1
    targets[2, 30:] = -1  # ignored rows, inside and at the end of a chunk

    def loss_and_grads(loss_fn, incoming=3.0):
        x.grad = None
        head.zero_grad(set_to_none=True)
        loss = loss_fn()
        (incoming * loss).backward()
        return loss, [t.grad for t in (x, head.weight, head.bias) if t is not None]

    def check(ignore_index, targets, incoming):
        expected, expected_grads = loss_and_grads(
            lambda: chunked_cross_entropy(head, x, targets, ignore_index, chunk_size=8), incoming)
        got, grads = loss_and_grads(
            lambda: linear_cross_entropy(x, head.weight, head.bias, targets, ignore_index), incoming)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
        return got

    no_grad_loss = check(-1, targets, incoming=3.0)  # an incoming gradient other than 1
    check(-1, targets, incoming=1.0)  # 1: the saved gradients as they are
    check(50, torch.where(targets == -1, 50, targets), incoming=1.0)  # an ignore_index outside the vocabulary
    assert linear_cross_entropy(x, head.weight, head.bias, torch.full_like(targets, -1), -1).item() == 0.0
    with torch.no_grad():
        assert torch.equal(linear_cross_entropy(x, head.weight, head.bias, targets, -1), no_grad_loss)
    # no rows at all: zero gradients (the first chunk's matmul writes the weight's gradient; here there is none)
    head.zero_grad(set_to_none=True)
    linear_cross_entropy(x[:, :0], head.weight, head.bias, targets[:, :0], -1).backward()
    assert head.weight.grad is not None and not head.weight.grad.any()
    head.weight.requires_grad_(False)  # a frozen head (LoRA): no weight gradient is made
    loss_and_grads(lambda: linear_cross_entropy(x, head.weight, None, targets, -1))
    assert head.weight.grad is None and x.grad is not None
    # what the backward keeps: no (B, T, V) tensor (the head path keeps the log-probabilities)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy(x, head.weight, None, targets, -1)
    assert sum(saved) < targets.numel() * 50


def test_training_loss_takes_the_fused_head_where_it_applies(monkeypatch):
    model = fresh_model(tiny_config())  # n_embd 32
    idx = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))  # 48 tokens >= n_embd
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    x = torch.zeros(2, 24, 32)
    assert model._fused_loss_applies(x)
    with torch.no_grad():
        assert not model._fused_loss_applies(x)  # scoring: nothing to differentiate
    assert not model._fused_loss_applies(x[:, :8])  # 16 tokens < n_embd: the (V, C) gradient would outweigh (N, V)
    fused = model(idx, targets=targets)
    fused.backward()
    fused_grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(GPT, "_fused_loss_applies", lambda self, x: False)
    unfused = model(idx, targets=targets)
    unfused.backward()
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=0)
    for got, expected in zip(fused_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    monkeypatch.undo()
    model.lm_head.weight.requires_grad_(False)
    assert model._fused_loss_applies(x[:, :8])  # a frozen head makes no (V, C) gradient: any length
    assert not model._fused_loss_applies(x.bfloat16())
    assert not fresh_model(tiny_config(final_logit_softcapping=30.0))._fused_loss_applies(x)
    model.lm_head.register_forward_pre_hook(lambda m, a: None)  # e.g. FSDP's: the module call must happen
    assert not model._fused_loss_applies(x)


def test_default_loss_is_a_token_sum_and_passes_extra_batch_keys():
    model = fresh_model(tiny_config())
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 320, (2, 12), generator=g)
    labels = torch.randint(0, 320, (2, 12), generator=g)
    labels[1, 8:] = -7
    # input_pos (RoPE positions) reach the model: restarting positions change the loss (RoPE), the default ones don't
    positions = torch.arange(12).expand(2, 12)
    loss_sum, count, metrics = token_cross_entropy(model, {"input_ids": input_ids, "labels": labels}, -7)
    assert count == 20 and metrics == {}
    expected = F.cross_entropy(model(input_ids).flatten(0, 1), labels.flatten(), ignore_index=-7, reduction="sum")
    torch.testing.assert_close(loss_sum, expected)
    same, _, _ = token_cross_entropy(model, {"input_ids": input_ids, "labels": labels, "input_pos": positions}, -7)
    shifted, _, _ = token_cross_entropy(model, {"input_ids": input_ids, "labels": labels, "input_pos": positions % 6}, -7)
    torch.testing.assert_close(same, loss_sum)
    assert not torch.allclose(shifted, loss_sum)
    with pytest.raises(TypeError):  # a key the model doesn't take is an error, not silently dropped
        token_cross_entropy(model, {"input_ids": input_ids, "labels": labels, "not_a_model_argument": positions}, -7)


class OtherIgnoreIndex(FixedTokens):
    """FixedTokens whose padded labels are -1, declared as the data module's ignore_index."""

    ignore_index = -1

    def setup(self) -> None:
        super().setup()
        for s in self.samples:
            s["labels"][s["labels"] == -100] = -1


def test_ignore_index_comes_from_the_data_module(fabric, tmp_path):
    standard = train_once(fabric, tmp_path / "a", data=FixedTokens(pad_every=2), max_steps=2)
    other = train_once(fabric, tmp_path / "b", data=OtherIgnoreIndex(pad_every=2), max_steps=2)
    assert other.losses == standard.losses


class RecordingLogger:
    def __init__(self):
        self.metrics = {}

    def log_hyperparams(self, params):
        pass

    def log_metrics(self, metrics, step):
        self.metrics.setdefault(step, {}).update(metrics)

    def finalize(self, status="success"):
        pass


def test_a_custom_loss_and_its_metrics_reach_the_log(fabric, tmp_path):
    """Method.loss decides what is minimised and over what it is averaged; its metrics are logged as
    global means per counted item, in training and validation."""
    from litllm.train.args import EvalArgs, RunArgs, TrainArgs
    from litllm.train.loop import fit, setup

    seen = []

    def sequence_loss(model, batch, ignore_index):  # one count per row (as DPO counts pairs)
        seen.append(sorted(batch))
        logps = token_logprobs(torch.nn.Identity(), model(batch["input_ids"]), batch["labels"], ignore_index)
        rows = logps.sum(-1)  # (B,)
        return -rows.sum(), torch.tensor(rows.numel()), {"first_logp": logps[:, 0].sum()}

    logger = RecordingLogger()
    data = FixedTokens(pad_every=2)
    result = fit(setup(
        fabric, fresh_model(tiny_config()), Method(loss=sequence_loss), data, None,
        TrainArgs(global_batch_size=8, micro_batch_size=2, max_steps=1, save_interval=None, lr_warmup_steps=0),
        EvalArgs(interval=100, max_iters=1, initial_validation=True), {"class_path": "SGD", "init_args": {"lr": 0.0}},
        tmp_path, RunArgs(seed=7), logger=logger,
    ))
    assert seen[0] == ["input_ids", "labels"]
    check = FixedTokens(pad_every=2)
    check.connect(None, batch_size=8, max_seq_length=16)
    check.setup()
    batch = next(iter(check.train_dataloader()))
    model = fresh_model(tiny_config())
    with torch.no_grad():
        logits = model(batch["input_ids"])
    nll = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none").view(8, -1)
    assert result.losses[1] == pytest.approx(nll.sum().item() / 8, rel=1e-5)  # a row mean, not a token mean
    first = -nll[:, 0].mean().item()
    assert logger.metrics[1]["first_logp"] == pytest.approx(first, rel=1e-5)
    # lr 0: the model didn't move, so validation (initial and final) sees the same values on its batch
    assert logger.metrics[0]["val_loss"] == pytest.approx(logger.metrics[1]["val_loss"], rel=1e-6)
    assert "val_first_logp" in logger.metrics[0]


# ---------------------------------------------------------------------- adapters off
def _train_a_little(model, steps=3):
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 320, (2, 10), generator=g)
        model(x, targets=torch.roll(x, -1, 1)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind", ["lora", "adapter", "adapter_v2"])
def test_disable_adapters_gives_the_base_model_exactly(kind):
    from litllm.adapter import AdapterSettings, apply_adapter, adapter_parameter_names
    from litllm.lora import LoRASettings, add_lora, disable_adapters, is_lora_parameter

    config = tiny_config()
    base = fresh_model(config)
    model = GPT(config)
    model.load_state_dict(base.state_dict())
    if kind == "lora":
        add_lora(model, **asdict(LoRASettings(r=4, alpha=8, dropout=0.0, query=True, key=True, value=True,
                                              projection=True, mlp=True, head=True)))
        names = {n for n, _ in model.named_parameters() if is_lora_parameter(n)}
    else:
        apply_adapter(model, AdapterSettings(1 if kind == "adapter" else 2, 0, 4))
        # adapter v2 also trains the base's norms, which disable_adapters can't revert: keep them frozen here
        names = {n for n in adapter_parameter_names(model) if "adapter" in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    _train_a_little(model)  # LoRA B / adapter gates are no longer zero: the adapted model differs
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = base(x)
        adapted = model(x)
        assert not torch.allclose(adapted, expected)
        with disable_adapters(model):
            assert torch.equal(model(x), expected)
        assert torch.equal(model(x), adapted)  # switched back on
        with pytest.raises(RuntimeError), disable_adapters(model):
            raise RuntimeError  # an exception inside still switches them back on
        assert torch.equal(model(x), adapted)


# ---------------------------------------------------------------------- fake tensors
def _methods():
    from litllm.adapter import AdapterSettings, adapter_method
    from litllm.lora import LoRASettings, lora_method

    return {
        "full": Method(),
        "lora": lora_method(LoRASettings(r=4, alpha=8, dropout=0.05, mlp=True)),
        "adapter_v2": adapter_method(AdapterSettings(2, 1, 4)),
    }


@pytest.mark.parametrize("name", ["full", "lora", "adapter_v2", "moe"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_model_builds_and_steps_under_fake_tensors(fabric, name, checkpointing):
    """No real memory and no data-dependent host sync: what `litllm estimate` runs on a 70B model.
    "moe": 32 tokens would take MoE's sparse (routing-dependent) path on real tensors; fakes go dense."""
    from torch._subclasses import FakeTensorMode

    config = tiny_config(n_layer=3)
    if name == "moe":
        config = tiny_config(n_layer=3, mlp_class_name="MoE", n_expert=4, n_expert_per_token=2)
        name = "full"
    method = _methods()[name]
    with FakeTensorMode():
        model = build_train_model(config, method, activation_checkpointing=checkpointing)
        from torch._subclasses.fake_tensor import FakeTensor

        assert all(isinstance(p, FakeTensor) for p in model.parameters())
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and (name == "full") == (len(trainable) == len(list(model.parameters())))
        wrapped = fabric.setup_module(model, move_to_device=False)
        opt = fabric.setup_optimizers(torch.optim.AdamW(trainable, lr=1e-3))
        batches = [{"input_ids": torch.randint(0, 320, (2, 16)), "labels": torch.randint(0, 320, (2, 16))}
                   for _ in range(2)]
        sums, grad_norm = train_step(fabric, wrapped, opt, batches, max_norm=1.0, ignore_index=-100)
        assert isinstance(sums["loss"], FakeTensor) and isinstance(grad_norm, FakeTensor)
        assert set(sums) == {"loss", "count", "input_tokens"}
        assert all(p.grad is None for p in trainable)  # the step ran to zero_grad


# ---------------------------------------------------------------------- defaults that meet small data (issue 15)
class ShortSamples(FixedTokens):
    """Samples far shorter than the model's window, as finetuning data usually is."""

    def longest_sample(self):
        return self.seq_length


def test_unset_max_seq_length_sizes_the_run_for_the_data_not_the_window(fabric, tmp_path, capsys):
    from litllm.train.args import EvalArgs, RunArgs, TrainArgs
    from litllm.train.fabric import unwrap
    from litllm.train.loop import fit, setup

    config = tiny_config(block_size=131072)  # Llama 3.1's window
    trainer = setup(
        fabric, fresh_model(config), Method(), ShortSamples(seq_length=16), None,
        TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=2, save_interval=None, max_seq_length=None),
        EvalArgs(interval=100, max_iters=1, max_new_tokens=8), "AdamW", tmp_path, RunArgs(seed=7),
    )
    assert trainer.seq_length == 16
    assert unwrap(trainer.model).rope_cos.shape[0] == 16 + 8  # not 131072 positions
    assert "--train.max_seq_length unset: using 16" in capsys.readouterr().out
    assert fit(trainer).step == 2


def test_global_batch_larger_than_the_data_set_takes_the_set_once_per_step(fabric, tmp_path, capsys):
    result = train_once(fabric, tmp_path, data=FixedTokens(n_train=6), global_batch_size=16, micro_batch_size=2,
                        max_steps=None, epochs=3)
    out = capsys.readouterr().out
    assert out.count("--train.global_batch_size 16 exceeds the training set") == 1
    assert result.step == 3 and result.tokens_seen == 3 * 6 * 16  # each step: every sample once
    same = train_once(fabric, tmp_path / "same", data=FixedTokens(n_train=6), global_batch_size=6, micro_batch_size=2,
                      max_steps=None, epochs=3)
    assert same.losses == result.losses


def test_tiny_validation_set(fabric, tmp_path):
    """eval.max_iters far above the validation batches: the whole (one-sample) set, a finite loss."""
    from litllm.train.loop import validate

    result = train_once(fabric, tmp_path, data=FixedTokens(n_val=1), max_steps=2)
    data = FixedTokens(n_val=1)
    data.connect(None, batch_size=4, max_seq_length=32)
    data.setup()
    model = fresh_model(tiny_config())
    metrics = validate(fabric, model, data.val_dataloader(), max_iters=100, ignore_index=data.ignore_index)
    expected = model(data.samples[-1]["input_ids"][None], targets=data.samples[-1]["labels"][None])
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert result.step == 2


# ---------------------------------------------------------------------- hyperparameters.yaml
OLD_HYPERPARAMETERS = """\
checkpoint_dir: checkpoints/base
out_dir: out/finetune/lora
precision: null
quantize: null
devices: 1
num_nodes: 1
strategy: auto
accelerator: auto
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_query: true
lora_key: false
lora_value: true
lora_projection: false
lora_mlp: true
lora_head: false
data: null
train:
  save_interval: 1000
  global_batch_size: 16
eval:
  interval: 100
optimizer:
  class_path: torch.optim.AdamW
  init_args:
    lr: 0.0002
logger_name: csv
seed: 1337
resume: false
compile: false
activation_checkpointing: false
"""


def test_hyperparameters_written_by_the_old_code_still_read(tmp_path):
    """A hyperparameters.yaml as finetune_lora wrote it before RunArgs (dict(locals()) order) reads the same."""
    from litllm.hparams import read_hyperparameters, write_hyperparameters
    from litllm.lora import LoRASettings, read_lora_checkpoint

    (tmp_path / "hyperparameters.yaml").write_text(OLD_HYPERPARAMETERS)
    (tmp_path / "lit_lora.safetensors").write_bytes(b"")
    hparams, settings = read_lora_checkpoint(tmp_path)
    assert hparams["checkpoint_dir"] == "checkpoints/base" and hparams["devices"] == 1
    assert settings == LoRASettings(r=4, alpha=8, dropout=0.0, query=True, key=False, value=True, mlp=True)
    (tmp_path / "again").mkdir()
    write_hyperparameters(tmp_path / "again", {**hparams, "checkpoint_dir": tmp_path})  # a Path is written as a string
    assert read_hyperparameters(tmp_path / "again") == {**hparams, "checkpoint_dir": str(tmp_path)}


def test_an_old_hyperparameters_file_reads_back_as_the_job():
    """hyperparameters.yaml is the job flattened; an old file reads back through the same field map, typed."""
    import yaml

    from litllm.finetune import FINETUNE_TRAIN, LoRAJob
    from litllm.flags import flatten, unflatten
    from litllm.lora import LoRASettings
    from litllm.train.args import TrainArgs

    old = yaml.safe_load(OLD_HYPERPARAMETERS)
    job = unflatten(LoRAJob, old)
    assert job.lora == LoRASettings(r=4, alpha=8, dropout=0.0, query=True, key=False, value=True, mlp=True)
    assert (job.run.devices, job.run.seed, job.run.fast_dev_run, job.quantize) == (1, 1337, False, None)
    # a nested group the file holds in part: the rest from the command's defaults
    assert isinstance(job.train, TrainArgs) and job.train.global_batch_size == 16
    assert job.train.epochs == FINETUNE_TRAIN.epochs and job.eval.interval == 100
    flat = flatten(job)
    assert list(flat)[:3] == ["checkpoint_dir", "out_dir", "quantize"]  # the flags' order
    assert {k: flat[k] for k in old if k not in ("train", "eval")} == {k: v for k, v in old.items()
                                                                       if k not in ("train", "eval")}


def test_new_commands_write_the_same_flat_hyperparameters(tmp_path, monkeypatch):
    """The shared flags are flat keys in hyperparameters.yaml, as before (merge_lora reads them)."""
    import litllm.finetune as finetune

    from litllm.hparams import hyperparameters

    captured = {}
    monkeypatch.setattr(finetune, "launch", lambda job: captured.setdefault("job", job))
    finetune.finetune_lora(tmp_path, devices=2, lora_r=4, resume="auto")
    job = captured["job"]
    assert (job.run.devices, job.run.seed, job.run.resume, job.lora.r) == (2, 1337, "auto", 4)
    hparams = hyperparameters(job)
    keys = set(yaml_keys(OLD_HYPERPARAMETERS)) | {"fast_dev_run", "logger"}  # + the shared flags added since
    assert set(hparams) == keys
    assert hparams["lora_r"] == 4 and hparams["devices"] == 2


def yaml_keys(text):
    import yaml

    return list(yaml.safe_load(text))


# ---------------------------------------------------------------------- final/ is written whole or not at all
def test_a_failure_while_writing_the_outputs_leaves_no_final_folder(fabric, tmp_path):
    """Every file of final/ (the method's own too: LoRA's lit_lora.safetensors) is written before final/ is renamed
    into place: a failure on the way leaves neither final/ nor a partial file; with no failure, it is all there."""
    from dataclasses import replace

    from litllm.lora import LoRASettings, lora_method
    from litllm.model_folder import save_model_weights
    from litllm.train.args import EvalArgs, RunArgs, TrainArgs
    from litllm.train.loop import fit, setup
    from litllm.utils import OutputWriteError

    base = tmp_path / "base.safetensors"
    model = fresh_model(tiny_config())
    save_model_weights({k: v.contiguous() for k, v in model.state_dict().items()}, base)
    lora = lora_method(LoRASettings(r=2, alpha=4, dropout=0.0), base_weights=base)
    written = {}

    def failing_outputs(folder, state_dict):
        lora.write_outputs(folder, state_dict)  # the LoRA weights are written, then the disk fills up
        written["files"] = sorted(p.name for p in folder.iterdir())
        raise OSError(28, "No space left on device")

    def train(out_dir, method):
        return fit(setup(fabric, fresh_model(tiny_config()), method, FixedTokens(), None,
                         TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=1, save_interval=None),
                         EvalArgs(interval=100, max_iters=1, final_validation=False), "AdamW", out_dir, RunArgs(seed=7)))

    with pytest.raises(OutputWriteError, match="final: cannot write it \(no space left"):
        train(tmp_path / "out", replace(lora, write_outputs=failing_outputs))
    assert "lit_lora.safetensors" in written["files"]  # written inside the folder that was to become final/
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "final" in p.name) == []  # no final/, no leftover
    result = train(tmp_path / "ok", lora)
    assert {"lit_model.safetensors", "lit_lora.safetensors", "hyperparameters.yaml"} <= {
        p.name for p in result.final_dir.iterdir()}
