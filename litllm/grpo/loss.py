"""GRPO's objective, as TRL's `GRPOTrainer` computes it (token-level importance sampling).

With per-token log-probs `logp` of the policy (logits / temperature), `old` those at generation time, `ref` the
reference model's and advantage `A` of the completion:

    ratio = exp(logp - old);  loss_t = -min(ratio * A, clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A)
    loss_t += beta * ratio * (exp(ref - logp) - (ref - logp) - 1)  (k3 KL estimator, beta > 0 only, times the ratio
                                                                    as TRL's default use_bias_correction_kl)

reduced over the completion tokens by `loss_type`:

- grpo:    the mean over completions of each completion's token mean (longer completions weigh less per token);
- dapo:    the sum over every token of the generation batch / its token count (TRL's default);
- bnpo:    per micro-batch, sum / its token count, averaged over micro-batches;
- dr_grpo: sum / (completions x max_new_tokens): no length bias at all.

`Method.loss` returns (sum, count) and the loop divides the global sums: the count is the completions (grpo,
dr_grpo), the tokens (dapo) or 1 per micro-batch (bnpo), which reproduces TRL's normalisation exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn

from litllm.errors import LitLLMError

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
ScaleRewards = Literal["group", "batch", "none"]
STD_EPS = 1e-4  # TRL's: advantages = (r - mean) / (std + 1e-4)


@dataclass
class GRPOSettings:
    """GRPO's sampling and objective; its fields are `finetune_grpo`'s flags of the same names."""

    num_generations: int = 8
    """Completions sampled per prompt (the group whose rewards are compared)."""
    max_new_tokens: int = 256
    """Completion length limit in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (and of the log-probs the loss uses)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of the rollouts."""
    top_k: Optional[int] = None
    """Sample among the k most likely tokens only (unset: all)."""
    loss_type: LossType = "dapo"
    """`dapo` (TRL's default: token-level mean over the batch), `grpo` (mean of per-completion means),
    `bnpo` (token mean per micro-batch), `dr_grpo` (sum / (completions x max_new_tokens))."""
    epsilon: float = 0.2
    """Lower clipping bound of the importance ratio (1 - epsilon); the upper one too unless `--epsilon_high`."""
    epsilon_high: Optional[float] = None
    """Upper clipping bound (1 + epsilon_high); DAPO uses 0.28."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference model (0: no reference pass at all; with LoRA the
    reference is the model with its adapters switched off)."""
    scale_rewards: ScaleRewards = "group"
    """Divide advantages by the std of the prompt's group (`group`), of the batch (`batch`), or not."""
    num_iterations: int = 1
    """Optimizer steps per generated batch (later steps use importance ratios)."""
    mask_truncated_completions: bool = False
    """Leave completions cut at `--max_new_tokens` out of the loss."""
    compile_rollouts: Optional[bool] = None
    """Decode the rollouts on a compiled step, saved in ~/.cache/litllm/torch_compile and loaded by later runs (default: when it pays: a run of at least 512 rollout decode steps (--train.max_steps / --num_iterations x --max_new_tokens) on the CPU, or whenever a saved step fits, or as $LITLLM_COMPILE says; false: never). CPU, one process, unquantized weights; else eager. (`--compile` compiles the training blocks.)"""

    def validate(self) -> None:
        if self.num_generations < 2:
            raise LitLLMError(f"--num_generations must be >= 2 (advantages compare completions of a prompt), got "
                              f"{self.num_generations}")
        if self.max_new_tokens < 1:
            raise LitLLMError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise LitLLMError(f"--temperature must be > 0 (GRPO samples), got {self.temperature}")
        if self.loss_type not in ("grpo", "dr_grpo", "dapo", "bnpo"):
            raise LitLLMError(f"--loss_type: expected grpo, dr_grpo, dapo or bnpo, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise LitLLMError(f"--scale_rewards: expected group, batch or none, got {self.scale_rewards!r}")
        if not 0 <= self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise LitLLMError(f"--epsilon must be in [0, 1) and --epsilon_high >= 0, got {self.epsilon}, "
                              f"{self.epsilon_high}")
        if self.beta < 0:
            raise LitLLMError(f"--beta must be >= 0, got {self.beta}")
        if self.num_iterations < 1:
            raise LitLLMError(f"--num_iterations must be >= 1, got {self.num_iterations}")

    @property
    def upper_epsilon(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def _nanstd(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaN (TRL's `nanstd`)."""
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    n = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nanmean((x - mean) ** 2, dim=dim) * n / (n - 1)
    return var.sqrt()


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: ScaleRewards,
                     batch_rewards: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (N,), std is zero (N,) bool) of the summed rewards (N,) of prompts' G consecutive completions.

    advantage = reward - its group's mean, divided by (std + 1e-4): the group's std (`group`), the batch's (`batch`:
    the std of `batch_rewards`, the whole generation batch's rewards (M,), `rewards` themselves if None) or not at
    all (`none`). A completion no function scored (NaN) gets advantage 0."""
    groups = rewards.view(-1, num_generations)  # (B, G)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale == "batch":
        batch_rewards = rewards if batch_rewards is None else batch_rewards
        std = (_nanstd(batch_rewards).expand_as(rewards) if batch_rewards.numel() > 1
               else torch.zeros_like(rewards))
    else:
        std = _nanstd(groups, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def combine(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N,) weighted reward of (N, F) per-function rewards; NaN where no function scored a completion."""
    total = (per_function * weights.to(per_function.device)).nansum(dim=1)
    return total.masked_fill(torch.isnan(per_function).all(dim=1), float("nan"))


def inner_module(model: nn.Module) -> nn.Module:
    """The GPT inside Fabric's wrapper and, under DDP, inside DistributedDataParallel (its hooks and caches live there)."""
    from litllm.train.fabric import unwrap

    module = unwrap(model)
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def completion_logps(model: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor, prompt_lens: torch.Tensor,
                     temperature: float, num_generations: int = 1) -> torch.Tensor:
    """Per-token log-probs (N, C) fp32 of each row's completion tokens under softmax(logits / temperature).

    input_ids (N, L): row i is its prompt (prompt_lens[i] tokens) then its completion, right-padded;
    completion_mask (N, C): 1 on the completion's first tokens. Only the positions that predict a completion token
    reach the output head (`head_only_at`), so prompt and padding positions cost no (V,)-wide logits.
    `num_generations` G > 1: each G consecutive rows share their prompt, which runs once for them where that costs
    less (`litllm.grpo.prefix`; the same log-probs up to float rounding)."""
    from litllm.grpo.prefix import shared_prompt_logps, worth_sharing
    from litllm.losses import token_logprobs
    from litllm.preference import head_only_at

    gpt = inner_module(model)
    if worth_sharing(gpt.config, completion_mask, prompt_lens, num_generations):
        return shared_prompt_logps(model, gpt, input_ids, completion_mask, prompt_lens, temperature, num_generations)
    n, length = input_ids.shape
    completion_len = completion_mask.size(1)
    offsets = torch.arange(completion_len, device=input_ids.device)
    at = (prompt_lens[:, None] - 1 + offsets[None, :]).clamp(max=length - 1)  # (N, C): position predicting token j
    keep = torch.zeros(n, length, dtype=torch.bool, device=input_ids.device)
    keep.scatter_(1, at, completion_mask.bool())
    targets = torch.full_like(input_ids, -100)
    next_tokens = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)  # (N, L): the token each position predicts
    targets[keep] = next_tokens[keep]
    with head_only_at(gpt, keep):
        logits = model(input_ids)  # (1, K, V)
    if temperature != 1.0:  # (at 1 the division is exact: no (K, V) copy, nor its backward)
        logits = logits / temperature
    picked = token_logprobs(nn.Identity(), logits, targets[keep].unsqueeze(0))[0]  # (K,)
    out = torch.zeros(completion_mask.shape, dtype=picked.dtype, device=picked.device)
    return out.masked_scatter(completion_mask.bool(), picked)


def grpo_objective(settings: GRPOSettings, logps: torch.Tensor, old_logps: Optional[torch.Tensor],
                   ref_logps: Optional[torch.Tensor], advantages: torch.Tensor,
                   loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss sum, count, {metric: mean}) of a micro-batch, normalised by `settings.loss_type` (see the module).

    logps, old_logps, ref_logps, loss_mask: (N, C); advantages: (N,). old_logps None: the generation's own policy
    (ratio 1, TRL's shortcut for num_iterations 1)."""
    s = settings
    mask = loss_mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)  # (N, C)
    clipped = torch.clamp(ratio, 1 - s.epsilon, 1 + s.upper_epsilon)
    a = advantages.unsqueeze(1)  # (N, 1)
    per_token = -torch.min(ratio * a, clipped * a)
    metrics: dict[str, torch.Tensor] = {}
    tokens = mask.sum()

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return (x * mask).sum() / tokens.clamp(min=1.0)

    if s.beta != 0.0:
        diff = ref_logps - logps
        # times the ratio (TRL's default use_bias_correction_kl): the unbiased reverse-KL gradient (DeepSeek-V3.2)
        kl = (torch.exp(diff) - diff - 1) * ratio
        per_token = per_token + s.beta * kl
        metrics["kl"] = masked_mean(kl.detach())
    low = ((ratio < 1 - s.epsilon) & (a < 0)).to(logps.dtype)
    high = ((ratio > 1 + s.upper_epsilon) & (a > 0)).to(logps.dtype)
    metrics["clip_ratio/low_mean"] = masked_mean(low)
    metrics["clip_ratio/high_mean"] = masked_mean(high)
    metrics["clip_ratio/region_mean"] = masked_mean(torch.maximum(low, high))
    summed = (per_token * mask).sum(-1)  # (N,)
    n = torch.tensor(float(logps.size(0)), device=logps.device)
    if s.loss_type == "grpo":
        loss, count = (summed / mask.sum(-1).clamp(min=1.0)).sum(), n
    elif s.loss_type == "dapo":
        # a micro-batch with no loss token (all masked as truncated) counts 1: the loop needs a count > 0
        loss, count = summed.sum(), torch.where(tokens > 0, tokens, torch.ones_like(tokens))
    elif s.loss_type == "bnpo":
        loss, count = summed.sum() / tokens.clamp(min=1.0), torch.ones((), device=logps.device)
    else:  # dr_grpo
        loss, count = summed.sum() / s.max_new_tokens, n
    return loss, count, metrics
