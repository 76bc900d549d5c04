"""litllm's preference losses against TRL's, on the same tiny model, pair batch and beta (fp32, CPU).

TRL's `DPOTrainer` is built once per method (full: an explicit reference model; LoRA: a PEFT model
whose reference is the model with its adapter disabled) and its own loss computation
(`_compute_loss`) runs on TRL's own collation (`DataCollatorForPreference`) of the very token ids
litllm's `Preference` data module produced. Loss, every reward metric and the first step's
gradients must agree within 1e-5. SimPO is checked against TRL's `CPOTrainer.cpo_loss`.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import make_converted_checkpoint

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from litllm.data.preference import PairCollate, PreferenceRecord, tokenize_pairs  # noqa: E402
from litllm.model import GPT  # noqa: E402
from litllm.preference import (  # noqa: E402
    METRICS, PreferenceSettings, adapters_off_reference, frozen_reference, preference_loss,
)

PAIRS = [
    ("Say the number 3", "The number is 3.", "Numbers are boring!"),
    ("Write a haiku about autumn", "Leaves drift on cold wind.", "No."),
    ("What is 2 + 2?", "It is 4.", "It is 5."),
]
BETA = 0.3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_converted_checkpoint(tmp_path_factory.mktemp("dpo_oracle"))


@pytest.fixture(scope="module")
def samples(folder):
    from litllm.prompts import PromptStyle
    from litllm.tokenizer import Tokenizer

    records = [PreferenceRecord(f"pairs record {i}", prompt=p, chosen=c, rejected=r) for i, (p, c, r) in enumerate(PAIRS)]
    return tokenize_pairs(records, Tokenizer(folder), PromptStyle.from_name("default"), max_seq_length=127)


def _lit_batch(samples):
    return PairCollate(pad_id=0, ignore_index=-100)(samples)


def _trl_inputs(samples, swap: bool = False):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [{"prompt_ids": s["prompt_ids"].tolist(), "chosen_ids": s["chosen_ids"].tolist(),
                 "rejected_ids": s["rejected_ids"].tolist()} for s in samples]
    if swap:
        examples = [dict(e, chosen_ids=e["rejected_ids"], rejected_ids=e["chosen_ids"]) for e in examples]
    return DataCollatorForPreference(pad_token_id=0)(examples)


def _hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")


def _trainer(folder, tmp_path, model, ref_model):
    from datasets import Dataset

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=BETA, report_to=[], use_cpu=True, bf16=False,
                         per_device_train_batch_size=len(PAIRS), disable_dropout=True, save_strategy="no")
    dataset = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    return trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer)


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def methods(folder, tmp_path_factory):
    """{method: (litllm policy, litllm reference fn, TRL trainer, litllm param name -> TRL param)}."""
    from litllm.hf.config import infer_model_type
    from litllm.hf.weights import hf_sources, weight_map
    from litllm.lora import add_lora, save_peft_adapter

    out = {}
    # full: policy and reference are two copies; TRL gets an explicit reference model
    lit = GPT.from_checkpoint(folder)
    mapping = weight_map(lit.config, infer_model_type(lit.config))
    ref = GPT.from_checkpoint(folder).eval().requires_grad_(False)
    trainer = _trainer(folder, tmp_path_factory.mktemp("full"), _hf_model(folder), _hf_model(folder))
    hf_params = dict(trainer.model.named_parameters())
    names = {n: hf_sources(n, mapping) for n, _ in lit.named_parameters()}
    param_map = {n: [hf_params[s] for s in src.names] for n, src in names.items()}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same step away from the reference in both policies
        for name, param in lit.named_parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
            for hf, piece in zip(param_map[name], param.split([p.shape[0] for p in param_map[name]])):
                hf.copy_(piece)
    out["full"] = (lit, frozen_reference(ref, contextlib.nullcontext), trainer, param_map)

    # LoRA: the same (non-zero) update in litllm and as a PEFT adapter; the reference is the model with it off
    lit = GPT.from_checkpoint(folder)
    add_lora(lit, r=4, alpha=8, dropout=0.0, query=True, value=True, mlp=True)
    _randomize_lora(lit)
    peft_dir = tmp_path_factory.mktemp("peft")
    save_peft_adapter(lit, peft_dir)
    policy = peft.PeftModel.from_pretrained(_hf_model(folder), peft_dir, is_trainable=True)
    trainer = _trainer(folder, tmp_path_factory.mktemp("lora"), policy, None)
    # TRL keeps a copy of a pretrained adapter as the reference ("ref"); without one, its reference is the
    # model with the adapter disabled, which is what a fresh LoRA run has (and litllm's adapters_off_reference)
    trainer.model.delete_adapter("ref")
    trainer.model.set_adapter("default")
    hf_params = {n.replace(".default", ""): p for n, p in trainer.model.named_parameters()}
    trained = {}
    for name, param in lit.named_parameters():
        param.requires_grad_(".lora_" in name)
        if ".lora_" not in name:
            continue
        path, kind, part = name.rsplit(".", 2)  # blocks.0.attn.qkv, lora_A, query
        sources = hf_sources(f"{path}.weight", mapping)
        parts = [p for p, _ in next(m for n, m in lit.named_modules() if n == path).parts]
        source = sources.names[parts.index(part)] if sources.concatenated else sources.names[0]
        trained[name] = [hf_params[f"base_model.model.{source.removesuffix('.weight')}.{kind}.weight"]]
    out["lora"] = (lit, adapters_off_reference, trainer, trained)
    return out


def _trl_step(trainer, loss_name, inputs):
    trainer.beta = BETA
    trainer.loss_types, trainer.loss_weights = [{"dpo": "sigmoid", "ipo": "ipo"}[loss_name]], [1.0]
    trainer._metrics["train"].clear()
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("loss_name", ["dpo", "ipo"])
def test_loss_metrics_and_gradients_equal_trl(methods, samples, method, loss_name):
    lit, reference, trainer, param_map = methods[method]
    loss_fn = preference_loss(PreferenceSettings(loss_name, beta=BETA), reference)
    lit.train()
    lit.zero_grad(set_to_none=True)
    loss_sum, count, sums = loss_fn(lit, _lit_batch(samples), -100)
    loss = loss_sum / count
    loss.backward()
    trl_loss, trl_metrics = _trl_step(trainer, loss_name, _trl_inputs(samples))
    trl_loss.backward()

    assert int(count) == len(PAIRS)
    assert abs(loss.item() - trl_loss.item()) <= 1e-5, (loss.item(), trl_loss.item())
    assert loss.item() > 1e-3 and abs(loss.item() - math.log(2)) > 1e-3  # policy != reference: a real comparison
    for name in METRICS:
        assert abs(sums[name].item() / len(PAIRS) - trl_metrics[name]) <= 1e-5, (name, sums[name].item(), trl_metrics[name])
    assert 0 < sums["rewards/accuracies"].item() < len(PAIRS) or method == "full"
    compared = 0
    for name, param in lit.named_parameters():
        if not param.requires_grad:
            continue
        theirs = torch.cat([p.grad for p in param_map[name]])
        assert param.grad is not None and param.grad.abs().max() > 0, name
        torch.testing.assert_close(param.grad, theirs, rtol=0, atol=1e-5, msg=name)
        compared += 1
    assert compared == len(param_map)


def test_label_smoothing_is_conservative_dpo(methods, samples):
    """cDPO with smoothing eps = (1 - eps) x TRL's DPO loss + eps x TRL's DPO loss of the swapped pairs."""
    lit, reference, trainer, _ = methods["lora"]
    eps = 0.2
    with torch.no_grad():
        loss_sum, count, _ = preference_loss(PreferenceSettings("dpo", BETA, eps), reference)(lit, _lit_batch(samples), -100)
        plain, _ = _trl_step(trainer, "dpo", _trl_inputs(samples))
        swapped, _ = _trl_step(trainer, "dpo", _trl_inputs(samples, swap=True))
    assert abs((loss_sum / count).item() - ((1 - eps) * plain + eps * swapped).item()) <= 1e-5


def test_simpo_equals_trl_cpo_loss(samples, folder):
    from trl.experimental.cpo import CPOTrainer

    lit = GPT.from_checkpoint(folder).eval()
    settings = PreferenceSettings("simpo", beta=2.0, gamma=0.7, label_smoothing=0.1)
    with torch.no_grad():
        loss_sum, count, sums = preference_loss(settings, None)(lit, _lit_batch(samples), -100)
        inputs = _trl_inputs(samples)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        logits = _hf_model(folder).eval()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        chosen, rejected = logps.chunk(2)
        cpo = SimpleNamespace(beta=2.0, simpo_gamma=0.7, label_smoothing=0.1, loss_type="simpo", alpha=0.0,
                              accelerator=SimpleNamespace(device="cpu"))
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(cpo, chosen, rejected)
    n = len(PAIRS)
    assert abs((loss_sum / count).item() - losses.mean().item()) <= 1e-5
    assert abs(sums["rewards/chosen"].item() / n - chosen_rewards.mean().item()) <= 1e-5
    assert abs(sums["rewards/rejected"].item() / n - rejected_rewards.mean().item()) <= 1e-5
    assert abs(sums["logps/chosen"].item() / n - chosen.mean().item()) <= 1e-5


@pytest.mark.parametrize("method", ["full", "lora"])
def test_policy_equal_to_reference_gives_ln2_exactly(folder, samples, method):
    from litllm.lora import add_lora

    model = GPT.from_checkpoint(folder)
    if method == "lora":
        add_lora(model, r=4, alpha=8, dropout=0.1, mlp=True)  # B = 0 at init: the policy is the base
        reference = adapters_off_reference
    else:
        reference = frozen_reference(GPT.from_checkpoint(folder).eval())
    model.train()
    loss_sum, count, sums = preference_loss(PreferenceSettings("dpo"), reference)(model, _lit_batch(samples), -100)
    assert (loss_sum / count).item() == torch.tensor(math.log(2), dtype=torch.float32).item()
    assert sums["rewards/margins"].item() == 0 and sums["rewards/accuracies"].item() == 0
