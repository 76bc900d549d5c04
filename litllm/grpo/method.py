"""GRPO as a `Method.loss` of the one training loop: rollout, rewards, advantages and TRL's objective per micro-batch.

A micro-batch of B prompts (`litllm.data.prompts`) becomes B x G completions sampled on the decode engine with
the policy's current weights (`rollout`), scored by the reward functions (`rewards`), turned into group-normalised
advantages and trained on with the clipped surrogate objective (`loss`). With `num_iterations` > 1 the loader serves
each generation window that many times: iteration 0 samples and keeps the rollout (with the policy's log-probs at
generation time, the importance ratios' denominator) in a `RolloutBuffer`, the later iterations reuse it. The buffer
is part of the loader's state, so a checkpoint taken between iterations resumes exactly.

Validation samples the validation prompts the same way (the policy in eval mode) and reports the same metrics
(`val_reward`, ...); a few completions with their rewards are printed and appended to `out_dir/completions.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from litllm.errors import LitLLMError
from litllm.grpo.loss import GRPOSettings, combine, completion_logps, group_advantages, grpo_objective, inner_module
from litllm.grpo.rewards import Reward, score
from litllm.grpo.rollout import Rollout, completion_seed, pack, sample_completions
from litllm.train.fabric import whole_weights

Reference = Callable[[nn.Module, Rollout, float, int], torch.Tensor]  # (policy, rollout, temperature, G)
SAMPLES_SHOWN = 2


class RolloutBuffer:
    """The rollouts of the generation window in flight, {(epoch, batch index): Rollout}, kept for the later
    `num_iterations`; saved with the loader's position in every checkpoint.

    A checkpoint keeps rank 0's loader state only, and each rank sampled its own prompts: on several ranks the
    state is every rank's rollouts, gathered (`state_dict` is collective: the loop's checkpoint writer calls it on
    every rank), and each rank loads its own."""

    def __init__(self) -> None:
        self.rollouts: dict[tuple[int, int], Rollout] = {}

    def state_dict(self) -> dict:
        import torch.distributed as dist

        own = {f"{e}:{b}": r.state_dict() for (e, b), r in self.rollouts.items()}
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return own
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, own)
        return {"ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        import torch.distributed as dist

        if "ranks" in state:  # saved by several ranks (a resume on another count restarts the epoch: no load)
            state = state["ranks"][dist.get_rank() if dist.is_initialized() else 0]
        self.rollouts = {tuple(int(x) for x in key.split(":")): Rollout.from_state_dict(r) for key, r in state.items()}


def adapters_off_reference(model: nn.Module, rollout: Rollout, temperature: float,
                           num_generations: int) -> torch.Tensor:
    """The base model's completion log-probs: the policy with its LoRA switched off (no second copy)."""
    from litllm.lora import disable_adapters

    with torch.no_grad(), disable_adapters(model):
        return completion_logps(model, rollout.input_ids, rollout.completion_mask, rollout.prompt_lens, temperature,
                                num_generations)


def frozen_reference(reference: nn.Module, autocast: Callable) -> Reference:
    """Completion log-probs of a frozen copy of the initial model (full finetuning with beta > 0)."""

    def ref_logps(model: nn.Module, rollout: Rollout, temperature: float, num_generations: int) -> torch.Tensor:
        with torch.no_grad(), autocast():
            return completion_logps(reference, rollout.input_ids, rollout.completion_mask, rollout.prompt_lens,
                                    temperature, num_generations)

    return ref_logps


class GRPOLoss:
    """`Method.loss` of GRPO (see the module). `data` is the set-up `Prompts` module (records for the rewards)."""

    def __init__(self, settings: GRPOSettings, rewards: Sequence[Reward], data, tokenizer, stop_token_ids: Sequence[int],
                 reference: Optional[Reference], run_seed: int, buffer: Optional[RolloutBuffer] = None,
                 gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.s, self.rewards, self.data, self.tokenizer = settings, list(rewards), data, tokenizer
        self.stop_token_ids, self.reference, self.run_seed = list(stop_token_ids), reference, run_seed
        self.buffer = buffer if buffer is not None else RolloutBuffer()
        self.gather = gather or (lambda x: x)  # (N,) -> every rank's, stacked (Fabric's all_gather)
        self.window_info: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # of a window sampled at once
        self.weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        self.last_samples: list[dict[str, Any]] = []  # the latest validation rollout's first completions
        self.compile_rollouts: Optional[bool] = False  # decode on a compiled step (`rollout_compile`)
        self.rollout_rows = 0  # the most rows a rollout had: a smaller one decodes on the compiled step of as many

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], ignore_index: int):
        split = "train" if model.training else "val"
        epoch, batch_index, iteration = (int(x) for x in batch["generation"][0].tolist())
        key = (epoch, batch_index)
        info: dict[str, torch.Tensor] = {}
        if split == "train" and key in self.buffer.rollouts:  # a later iteration, or a window's later micro-batch
            rollout = self.buffer.rollouts[key].to(batch["input_ids"].device)
            info = self.window_info.pop(key, {}) if iteration == 0 else {}
        elif split == "train" and iteration > 0:
            raise LitLLMError(f"GRPO: no buffered rollout for iteration {iteration} of epoch {epoch} batch "
                              f"{batch_index} (a checkpoint from another --num_iterations?)")
        elif split == "train" and self.s.scale_rewards == "batch":
            rollout, info = self.generate_window(model, batch, epoch, batch_index)
        else:
            rollout, info = self.generate(model, batch, split, epoch)
            if split == "train" and self.s.num_iterations > 1:
                self.buffer.rollouts[key] = rollout  # until its last iteration (one per micro-batch of the window)
        if split == "train" and iteration == self.s.num_iterations - 1:
            self.buffer.rollouts.pop(key, None)
        return self.objective(model, rollout, info)

    def objective(self, model: nn.Module, rollout: Rollout, info: dict[str, torch.Tensor]):
        """(loss sum, count, {metric: sum over the count}) of a rollout (the loop's `Method.loss` contract)."""
        logps = completion_logps(model, rollout.input_ids, rollout.completion_mask, rollout.prompt_lens,
                                 self.s.temperature, self.s.num_generations)
        loss_mask = rollout.completion_mask
        if self.s.mask_truncated_completions:
            loss_mask = loss_mask * (~rollout.truncated).unsqueeze(1).to(loss_mask.dtype)
        loss, count, means = grpo_objective(self.s, logps, rollout.old_logps, rollout.ref_logps, rollout.advantages,
                                            loss_mask)
        means.update(self.reward_metrics(rollout))
        means.update(info)
        return loss, count, {name: value.to(count.device).double() * count for name, value in means.items()}

    def reward_metrics(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """TRL's names: reward, reward_std, frac_reward_zero_std, rewards/<name>/mean, completions/*."""
        total = combine(rollout.rewards, self.weights)
        lengths = rollout.completion_mask.sum(1).float()
        out = {"reward": torch.nanmean(total), "reward_std": _std(total),
               "frac_reward_zero_std": self._zero_std(total).float().mean(),
               "completions/mean_length": lengths.mean(), "completions/clipped_ratio": rollout.truncated.float().mean()}
        for i, reward in enumerate(self.rewards):
            out[f"rewards/{reward.name}/mean"] = torch.nanmean(rollout.rewards[:, i])
        return out

    def _zero_std(self, total: torch.Tensor) -> torch.Tensor:
        return group_advantages(total, self.s.num_generations, self.s.scale_rewards)[1]

    @torch.no_grad()
    def generate(self, model: nn.Module, batch: dict[str, torch.Tensor], split: str, epoch: int) -> tuple[Rollout, dict]:
        """Sample, score and prepare the rollout of a prompt micro-batch; also ({"rollout/tokens_per_sec": ...})."""
        s, device = self.s, batch["input_ids"].device
        indices = batch["index"].tolist()
        prompts = [row[:n].tolist() for row, n in zip(batch["input_ids"], batch["prompt_lens"].tolist())]
        seeds = [completion_seed(self.run_seed, split, epoch, i, g) for i in indices for g in range(s.num_generations)]
        sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
        self.rollout_rows = max(self.rollout_rows, len(prompts) * s.num_generations)
        with whole_weights(inner_module(model)) as module:  # FSDP: decode on whole weights, no collectives
            completions, truncated, seconds = sample_completions(module, prompts, s.num_generations,
                                                                 s.max_new_tokens, sampling, seeds, self.stop_token_ids,
                                                                 self.compile_rollouts, self.rollout_rows)
        rewards, texts = self.score(split, indices, completions)
        total = combine(rewards, self.weights)
        advantages, _ = group_advantages(total, s.num_generations, s.scale_rewards)
        input_ids, prompt_lens, mask = pack(prompts, completions, s.num_generations, device)
        rollout = Rollout(input_ids, prompt_lens, mask, torch.tensor(truncated, device=device), rewards.to(device),
                          advantages.to(device))
        if split == "train" and s.num_iterations > 1:
            rollout.old_logps = completion_logps(model, input_ids, mask, prompt_lens, s.temperature, s.num_generations)
        if s.beta != 0.0:
            rollout.ref_logps = self.reference(model, rollout, s.temperature, s.num_generations)
        if split == "val":
            self.last_samples = [{"prompt": self.tokenizer.decode(torch.tensor(prompts[0])), "completion": t,
                                  "reward": float(r)} for t, r in zip(texts[:SAMPLES_SHOWN], total[:SAMPLES_SHOWN])]
        tokens = sum(len(c) for c in completions)
        return rollout, {"rollout/tokens_per_sec": torch.tensor(tokens / max(seconds, 1e-9), dtype=torch.float64)}

    @torch.no_grad()
    def generate_window(self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int,
                        batch_index: int) -> tuple[Rollout, dict]:
        """`--scale_rewards batch` as TRL's generation batch: the advantages are divided by the std of every reward of
        the optimizer step (all its micro-batches, all ranks). The window's first micro-batch samples and scores
        this rank's whole window (the later micro-batches' prompts from the loader), all-gathers the rewards, and
        buffers the later micro-batches' rollouts; returns the first's."""
        window = self.data.steps_per_generation
        first, device = batch_index - batch_index % window, batch["input_ids"].device
        rollouts, infos = {}, {}
        for b in range(first, first + window):
            micro = batch if b == batch_index else {
                k: v.to(device) for k, v in self.data.train_loader.batch_at(epoch, b).items()}
            rollouts[b], infos[b] = self.generate(model, micro, "train", epoch)
        totals = [combine(r.rewards, self.weights) for r in rollouts.values()]
        everything = self.gather(torch.cat(totals)).reshape(-1)  # (ranks x window x B x G,)
        for (b, rollout), total in zip(rollouts.items(), totals):
            rollout.advantages = group_advantages(total, self.s.num_generations, "batch", everything)[0]
            self.buffer.rollouts[(epoch, b)] = rollout  # popped at its last iteration
        self.window_info.update({(epoch, b): info for b, info in infos.items() if b != batch_index})
        return rollouts[batch_index], infos[batch_index]

    def score(self, split: str, indices: list[int], completions: list[list[int]]) -> tuple[torch.Tensor, list[str]]:
        """((N, F) rewards, completion texts) of the completions of records `indices` (G each, in order)."""
        G = self.s.num_generations
        stops = set(self.stop_token_ids)
        texts = [self.tokenizer.decode(torch.tensor(c[:-1] if c and c[-1] in stops else c, dtype=torch.long))
                 for c in completions]
        given, fields = self.data.record_fields(split, indices)
        prompts = [p for p in given for _ in range(G)]
        shown = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
        fields = {k: [v for v in values for _ in range(G)] for k, values in fields.items()}
        return score(self.rewards, prompts, shown, [list(c) for c in completions], fields), texts


def _std(x: torch.Tensor) -> torch.Tensor:
    from litllm.grpo.loss import _nanstd

    return _nanstd(x) if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)


def sample_logger(loss: GRPOLoss, out_dir: Path) -> Callable[[Any, nn.Module, int], None]:
    """`Method.after_validation`: print the latest validation completions with their rewards, and append them to
    out_dir/completions.jsonl (rank 0)."""

    def after_validation(fabric, model: nn.Module, step: int) -> None:
        if fabric.global_rank != 0 or not loss.last_samples:
            return
        with open(Path(out_dir) / "completions.jsonl", "a", encoding="utf-8") as f:
            for sample in loss.last_samples:
                f.write(json.dumps({"step": step, **sample}) + "\n")
                fabric.print(f"Step {step} sample (reward {sample['reward']:.3f}): {sample['prompt'][-200:]!r} -> "
                             f"{sample['completion'][:300]!r}")

    return after_validation


def rollout_compile(asked: Optional[bool], fabric, quantized: bool, steps: Optional[int]) -> Optional[bool]:
    """Do the rollouts decode on a compiled step? `asked` (`--compile_rollouts`; None: where it pays for a run of
    `steps` rollout decode steps, None: unknown, or as $LITLLM_COMPILE says: `should_compile`; a rollout's rows share
    each step, so what compiling saves scales with steps, not tokens) on the CPU in one process with unquantized
    weights; else eager, with a one-line note when compiling was asked for. None: where it does not pay, a saved
    step that fits is still used (loading one costs milliseconds: `rollout_engine`)."""
    from litllm.compile_ledger import compile_choice, env_compile

    if fabric.world_size > 1:
        why = "with more than one process (DDP/FSDP)"
    elif fabric.device.type != "cpu":
        why = f"on {fabric.device.type} (a compiled rollout step is CPU-only for now)"
    elif quantized:
        why = "of a quantized base (QLoRA)"
    else:
        return compile_choice(asked, fabric.device, steps)
    if asked or (asked is None and env_compile()):
        fabric.print(f"note: --compile_rollouts: the rollouts decode eagerly {why}")
    return False


def grpo_method(method, settings: GRPOSettings, rewards: Sequence[Reward], fabric, data, tokenizer, style, *,
                checkpoint_dir: Path, out_dir: Path, seed: int, accumulation: int, compute_dtype: torch.dtype,
                quantized: bool = False, rollout_steps: Optional[int] = None):
    """`method` (LoRA, QLoRA or full finetuning) with GRPO's loss and its reference: none (beta 0), the same model
    with its LoRA switched off (LoRA), or a frozen copy of the initial model in `checkpoint_dir` (full); and the
    `Prompts` data module told the run's shape (`accumulation`: micro-batches per optimizer step on a rank).
    `quantized`: a QLoRA base; `rollout_steps`: the run's rollout decode steps (None: unknown), for
    `--compile_rollouts`'s default (`rollout_compile`)."""
    from dataclasses import replace

    from litllm.data.prompts import Prompts
    from litllm.engine import default_stops

    if not isinstance(data, Prompts):
        raise LitLLMError("--data: finetune_grpo needs prompts: --data Prompts --data.json_path FILE")
    buffer = RolloutBuffer()
    data.max_new_tokens, data.num_iterations, data.run_seed = settings.max_new_tokens, settings.num_iterations, seed
    data.steps_per_generation = accumulation
    data.rank, data.world_size, data.extra_state = fabric.global_rank, fabric.world_size, buffer
    reference = None
    if settings.beta != 0.0:
        if method.name == "lora":
            reference = adapters_off_reference
        else:
            from litllm.model import GPT

            initial = GPT.from_checkpoint(checkpoint_dir, device=fabric.device, dtype=compute_dtype).eval()
            reference = frozen_reference(initial.requires_grad_(False), fabric.autocast)
    stops = default_stops(tokenizer, style)["stop_token_ids"]
    loss = GRPOLoss(settings, rewards, data, tokenizer, stops, reference, seed, buffer, gather=fabric.all_gather)
    loss.compile_rollouts = rollout_compile(settings.compile_rollouts, fabric, quantized, rollout_steps)
    return replace(method, name=f"grpo_{method.name}", loss=loss, after_validation=sample_logger(loss, out_dir))
