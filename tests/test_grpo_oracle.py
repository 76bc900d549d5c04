"""litllm's GRPO against TRL's `GRPOTrainer`, on the same tiny LoRA model, prompts, completions and rewards (fp32, CPU).

TRL's own code computes every number: its `_generate_and_score_completions` (with generation replaced by the fixed
completions: `_tokenize_prompts` / `_generate_single_turn` return litllm's prompt ids and the given completion ids)
scores the completions with the reward functions and gives the advantages, the log-probs at generation time and the
reference's; its `_compute_loss` gives the loss and metrics. litllm's `GRPOLoss` gets the same completions from its
(patched) sampler. Advantages, loss, metrics and the first step's gradients must agree within 1e-5, for every loss
type, with beta 0 and > 0, and with num_iterations 2 (the policy moved between generation and the loss, so the
importance ratios are not 1 and clipping happens). With `--scale_rewards batch` and gradient accumulation, the std
spans TRL's whole generation batch (every micro-batch of the step), and the accumulated loss and gradients agree too.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_converted_checkpoint

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from litllm.data.prompts import collate_prompts  # noqa: E402
from litllm.grpo import method as grpo_method  # noqa: E402
from litllm.grpo.loss import GRPOSettings  # noqa: E402
from litllm.grpo.rewards import Reward  # noqa: E402
from litllm.model import GPT  # noqa: E402

PROMPTS = ["What is 3 + 4?", "What is 3 + 5?"]
ANSWERS = ["7", "8"]
G = 4
MAX_NEW = 6


def text_reward(prompts, completions, answer, **_):
    """Depends on the text and a record field: how many characters of the completion occur in the answer's prompt."""
    return [float(sum(ch in p for ch in c)) / 3 + (0.5 if a in c else 0.0) for p, c, a in zip(prompts, completions, answer)]


def ids_reward(prompts, completions, completion_ids, **_):
    return [float(len(ids) % 3) - 0.7 * (ids[0] % 2) for ids in completion_ids]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_converted_checkpoint(tmp_path_factory.mktemp("grpo_oracle"))


@pytest.fixture(scope="module")
def prompt_ids(folder):
    from litllm.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    ids = [tokenizer.encode(p).tolist() for p in PROMPTS]
    # TRL left-pads prompts and its HF model numbers positions from 0 whatever the padding: equal lengths keep the
    # positions (and so the log-probs) comparable
    assert len({len(i) for i in ids}) == 1
    return ids


@pytest.fixture(scope="module")
def completions(folder):
    from litllm.tokenizer import Tokenizer

    eos = Tokenizer(folder).eos_id
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(len(PROMPTS) * G):
        n = [2, MAX_NEW, 4, 3, MAX_NEW, 5, 1, 4][i]
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        if n < MAX_NEW or i == 4:  # stopped (EOS included, as in TRL's mask); the others are truncated
            ids = ids[:-1] + [eos] if n == MAX_NEW else ids + [eos]
        out.append(ids[:MAX_NEW])
    return out


def _hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")


def _lora_pair(folder, tmp_path):
    """(litllm GPT with a random LoRA, PEFT model with the same adapter, {litllm name: [PEFT params]})."""
    from litllm.hf.config import infer_model_type
    from litllm.hf.weights import weight_map
    from litllm.lora import add_lora, save_peft_adapter

    lit = GPT.from_checkpoint(folder)
    add_lora(lit, r=4, alpha=8, dropout=0.0, query=True, value=True, mlp=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lit.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_peft_adapter(lit, tmp_path)
    policy = peft.PeftModel.from_pretrained(_hf_model(folder), tmp_path, is_trainable=True)
    mapping = weight_map(lit.config, infer_model_type(lit.config))
    return lit, policy, mapping


def _param_map(lit, model, mapping):
    from litllm.hf.weights import hf_sources

    hf_params = {n.replace(".default", ""): p for n, p in model.named_parameters()}
    trained = {}
    for name, param in lit.named_parameters():
        param.requires_grad_(".lora_" in name)
        if ".lora_" not in name:
            continue
        path, kind, part = name.rsplit(".", 2)
        sources = hf_sources(f"{path}.weight", mapping)
        parts = [p for p, _ in next(m for n, m in lit.named_modules() if n == path).parts]
        source = sources.names[parts.index(part)] if sources.concatenated else sources.names[0]
        trained[name] = hf_params[f"base_model.model.{source.removesuffix('.weight')}.{kind}.weight"]
    return trained


TEMPERATURE, EPSILON, EPSILON_HIGH = 0.9, 0.2, 0.28


def _trl_trainer(folder, policy, prompt_ids, completions, tmp_path, monkeypatch, **config):
    """TRL's GRPOTrainer on `policy` whose generation returns `completions` for the prompts `prompt_ids` (G each)."""
    from datasets import Dataset

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, num_generations=G,
        max_completion_length=MAX_NEW, temperature=TEMPERATURE, epsilon=EPSILON, epsilon_high=EPSILON_HIGH,
        reward_weights=[1.0, 0.5], disable_dropout=True, save_strategy="no", **config,
    )
    dataset = Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ANSWERS)])
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[text_reward, ids_reward], args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    if "ref" in getattr(trainer.model, "peft_config", {}):  # a fresh LoRA run's reference: the adapter disabled
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    rows = [ids for ids in prompt_ids for _ in range(G)]
    monkeypatch.setattr(trainer, "_tokenize_prompts", lambda prompts: (rows, None, {}))
    monkeypatch.setattr(trainer, "_generate_single_turn", lambda *a, **k: (completions, None))
    return trainer


def _lit_loss(folder, prompt_ids, completions, monkeypatch, data, **settings):
    """litllm's `GRPOLoss` whose sampler returns, for each prompt of `prompt_ids`, its G of `completions`."""
    from litllm.tokenizer import Tokenizer

    eos = Tokenizer(folder).eos_id
    by_prompt = {tuple(ids): completions[i * G: (i + 1) * G] for i, ids in enumerate(prompt_ids)}

    def sample(module, prompts, *args, **kwargs):
        out = [c for p in prompts for c in by_prompt[tuple(p)]]
        return out, [len(c) == MAX_NEW and c[-1] != eos for c in out], 1.0

    monkeypatch.setattr(grpo_method, "sample_completions", sample)
    settings = GRPOSettings(num_generations=G, max_new_tokens=MAX_NEW, temperature=TEMPERATURE, epsilon=EPSILON,
                            epsilon_high=EPSILON_HIGH, **settings)
    rewards = [Reward("text_reward", "t.py:text_reward", text_reward, 1.0),
               Reward("ids_reward", "t.py:ids_reward", ids_reward, 0.5)]
    return grpo_method.GRPOLoss(settings, rewards, data, Tokenizer(folder), [eos],
                                grpo_method.adapters_off_reference if settings.beta else None, run_seed=0)


class _Records:
    def record_fields(self, split, indices):
        return [PROMPTS[i] for i in indices], {"answer": [ANSWERS[i] for i in indices]}


CASES = [(loss_type, beta, 1) for loss_type in ("dapo", "grpo", "bnpo", "dr_grpo") for beta in (0.0, 0.05)]
CASES += [(loss_type, 0.05, 2) for loss_type in ("dapo", "grpo")] + [("bnpo", 0.0, 2)]


@pytest.mark.parametrize("loss_type, beta, num_iterations", CASES)
def test_advantages_loss_metrics_and_gradients_equal_trl(folder, prompt_ids, completions, tmp_path, monkeypatch,
                                                         loss_type, beta, num_iterations):
    lit, policy, mapping = _lora_pair(folder, tmp_path / "peft")
    trainer = _trl_trainer(folder, policy, prompt_ids, completions, tmp_path, monkeypatch, loss_type=loss_type,
                           beta=beta, num_iterations=num_iterations, scale_rewards="group",
                           per_device_train_batch_size=len(PROMPTS) * G)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets for a step of one micro-batch
    inputs = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ANSWERS) for _ in range(G)]
    prepared = trainer._generate_and_score_completions(inputs)
    trl_generation_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    loss_fn = _lit_loss(folder, prompt_ids, completions, monkeypatch, _Records(), loss_type=loss_type, beta=beta,
                        num_iterations=num_iterations)
    lit.train()
    batch = collate_prompts([{"prompt_ids": torch.tensor(ids), "index": torch.tensor(i)} for i, ids in enumerate(prompt_ids)])
    rollout, _ = loss_fn.generate(lit, batch, "train", 0)

    torch.testing.assert_close(rollout.advantages, prepared["advantages"], rtol=0, atol=1e-5)
    assert rollout.advantages.abs().max() > 0.1
    n_trl = prepared["completion_mask"].shape[1]
    for name in ("old_per_token_logps", "ref_per_token_logps"):
        ours = {"old_per_token_logps": rollout.old_logps, "ref_per_token_logps": rollout.ref_logps}[name]
        if prepared.get(name) is None:
            assert ours is None, name
        else:
            mask = prepared["completion_mask"].bool()
            torch.testing.assert_close(ours[:, :n_trl][mask], prepared[name][mask], rtol=0, atol=1e-5)
    param_map = _param_map(lit, trainer.model, mapping)
    if num_iterations > 1:  # the policy moves between generation and this step: ratios != 1, some clipped
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in lit.named_parameters():
                if param.requires_grad:
                    delta = torch.randn(param.shape, generator=g) * 0.3
                    param.add_(delta)
                    param_map[name].add_(delta)

    lit.zero_grad(set_to_none=True)
    loss_sum, count, sums = loss_fn.objective(lit, rollout, {})
    (loss_sum / count).backward()
    trainer._metrics["train"].clear()
    trainer.model.zero_grad(set_to_none=True)
    trl_loss = trainer._compute_loss(trainer.model, prepared)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    assert abs((loss_sum / count).item() - trl_loss.item()) <= 1e-5, ((loss_sum / count).item(), trl_loss.item())
    # on-policy grpo without KL is the mean of the per-completion mean advantages: 0 by construction (the gradients
    # still are not)
    assert abs(trl_loss.item()) > 1e-4 or (loss_type, beta, num_iterations) == ("grpo", 0.0, 1)
    ours = {k: v.item() / count.item() for k, v in sums.items()}
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert abs(ours[name] - trl_metrics[name]) <= 1e-5, (name, ours[name], trl_metrics[name])
    for name in ("reward", "reward_std", "frac_reward_zero_std", "rewards/text_reward/mean", "rewards/ids_reward/mean",
                 "completions/mean_length", "completions/clipped_ratio"):
        assert abs(ours[name] - trl_generation_metrics[name]) <= 1e-5, (name, ours[name], trl_generation_metrics[name])
    if num_iterations > 1:
        assert ours["clip_ratio/region_mean"] > 0
    for name, param in param_map.items():
        mine = dict(lit.named_parameters())[name].grad
        assert mine is not None and mine.abs().max() > 0, (name, mine)
        torch.testing.assert_close(mine, param.grad, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m} (largest gradient {mine.abs().max():.3g})")


class _Window(_Records):
    """The records plus a loader of one prompt per micro-batch, two micro-batches per optimizer step."""

    steps_per_generation = 2

    def __init__(self, prompt_ids):
        self.train_loader = self
        self.prompt_ids = prompt_ids

    def batch_at(self, epoch, batch_index, iteration=0):
        sample = {"prompt_ids": torch.tensor(self.prompt_ids[batch_index]), "index": torch.tensor(batch_index)}
        return collate_prompts([sample], (epoch, batch_index, iteration))


@pytest.mark.parametrize("loss_type, beta", [("dapo", 0.0), ("bnpo", 0.05), ("grpo", 0.0)])
def test_batch_scaled_advantages_span_the_accumulated_micro_batches_as_in_trl(folder, prompt_ids, completions,
                                                                             tmp_path, monkeypatch, loss_type, beta):
    """--scale_rewards batch with 2 micro-batches of one prompt per step (gradient accumulation 2): the advantages
    are divided by the std of all 8 rewards of the step, TRL's generation batch (its per_device_train_batch_size 4 x
    steps_per_generation 2), not by each micro-batch's; the accumulated loss and gradients equal TRL's two
    micro-batches (its generation batch split in order, each `_compute_loss` scaled for accumulation)."""
    from trl.trainer.utils import split_tensor_dict

    lit, policy, mapping = _lora_pair(folder, tmp_path / "peft")
    trainer = _trl_trainer(folder, policy, prompt_ids, completions, tmp_path, monkeypatch, loss_type=loss_type,
                           beta=beta, scale_rewards="batch", per_device_train_batch_size=G,
                           gradient_accumulation_steps=2)
    assert trainer.args.generation_batch_size == len(PROMPTS) * G
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ANSWERS) for _ in range(G)]
    prepared = trainer._generate_and_score_completions(inputs)

    data = _Window(prompt_ids)
    loss_fn = _lit_loss(folder, prompt_ids, completions, monkeypatch, data, loss_type=loss_type, beta=beta,
                        scale_rewards="batch")
    rollouts = []  # each micro-batch's, as the objective gets them
    objective = loss_fn.objective
    monkeypatch.setattr(loss_fn, "objective", lambda model, rollout, info: rollouts.append(rollout)
                        or objective(model, rollout, info))
    lit.train()
    param_map = _param_map(lit, trainer.model, mapping)
    lit.zero_grad(set_to_none=True)
    parts = [loss_fn(lit, data.batch_at(0, b), -100) for b in range(2)]  # the loop's micro-batches of one step
    loss = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    loss.backward()
    assert not loss_fn.buffer.rollouts  # the window's rollouts are used up

    advantages = torch.cat([r.advantages for r in rollouts])
    torch.testing.assert_close(advantages, prepared["advantages"], rtol=0, atol=1e-5)
    own_std = [grpo_method.group_advantages(grpo_method.combine(r.rewards, loss_fn.weights), G, "batch")[0]
               for r in rollouts]
    micro_scaled = torch.cat(own_std)
    assert (micro_scaled - advantages).abs().max() > 1e-2  # each micro-batch's own std would give other advantages

    trainer.model.zero_grad(set_to_none=True)
    trl_loss = 0.0
    for micro in split_tensor_dict(prepared, 2):
        part = trainer._compute_loss(trainer.model, micro)
        part.backward()
        trl_loss += part.item()
    assert abs(loss.item() - trl_loss) <= 1e-5, (loss.item(), trl_loss)
    assert abs(trl_loss) > 1e-4 or loss_type == "grpo"
    for name, param in param_map.items():
        mine = dict(lit.named_parameters())[name].grad
        assert mine is not None and mine.abs().max() > 0, (name, mine)
        torch.testing.assert_close(mine, param.grad, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
