"""Preference tuning losses (DPO, IPO, SimPO) as a `Method.loss` of the one training loop.

A batch holds B pairs as 2B rows, [chosen] * B then [rejected] * B (`litllm.data.preference`); one
forward scores both replies of every pair. A reply's log-probability is the sum of its tokens'
log-probs (labels != ignore_index). With policy log-probs pi_c, pi_r and reference log-probs
ref_c, ref_r, and h = (pi_c - ref_c) - (pi_r - ref_r):

- dpo:   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)      (eps = label_smoothing, cDPO)
- ipo:   (h' - 1 / (2 beta))^2, h' the same difference of per-token averages (TRL's normalisation)
- simpo: -(1 - eps) log sigmoid(beta (avg pi_c - avg pi_r) - gamma): no reference, length-normalised

Rewards follow TRL: beta * (pi - ref) (DPO, IPO), beta * avg pi (SimPO, as TRL's CPOTrainer).
`Method.loss` returns sums over the batch's pairs and the pair count, so the loop's step minimises
the mean loss over every pair of the global batch and logs every metric as its mean over pairs.

The reference model is one of: the policy with its LoRA/adapters switched off (`disable_adapters`,
no second copy), a frozen copy (full finetuning), or log-probs precomputed once before training
(`ref_logps` in the batch; `precompute_reference`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from litllm.errors import LitLLMError

PreferenceLossName = Literal["dpo", "ipo", "simpo"]
REFERENCE_FILE = "reference_logps.safetensors"
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


@dataclass
class PreferenceSettings:
    """The preference loss (the `--loss`, `--beta`, `--label_smoothing`, `--gamma` flags of `finetune_dpo`)."""

    loss: PreferenceLossName = "dpo"
    """`dpo` (sigmoid; `--label_smoothing` gives cDPO), `ipo`, or `simpo` (reference-free,
    length-normalised, margin `--gamma`)."""
    beta: float = 0.1
    """The loss temperature (TRL's default 0.1; SimPO's paper uses 2.0-2.5)."""
    label_smoothing: float = 0.0
    """Probability that a pair's preference is flipped (dpo, simpo); 0: plain DPO."""
    gamma: float = 0.5
    """SimPO's target reward margin (TRL's default 0.5)."""

    def validate(self) -> None:
        if self.loss not in ("dpo", "ipo", "simpo"):
            raise LitLLMError(f"--loss: expected dpo, ipo or simpo, got {self.loss!r}")
        if not self.beta > 0:
            raise LitLLMError(f"--beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise LitLLMError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss == "ipo":
            raise LitLLMError("--label_smoothing applies to --loss dpo and simpo, not ipo")


def reply_logps(model: nn.Module, batch: dict[str, torch.Tensor], ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of reply-token log-probs (2B,) fp32, reply tokens per row (2B,)) of a pair batch.

    The output head runs only where a reply token is the target (`head_only_at`): prompt and padding
    positions never become (V,)-wide logits, which saves the head's compute and memory there.
    """
    from litllm.losses import token_logprobs

    labels = batch["labels"]  # (2B, T)
    keep = labels != ignore_index  # (2B, T)
    with head_only_at(model, keep):
        logits = model(batch["input_ids"])  # (1, N, V): the N kept positions, row after row
    picked = token_logprobs(nn.Identity(), logits, labels[keep].unsqueeze(0), ignore_index)[0]  # (N,) fp32
    per_token = torch.zeros(keep.shape, dtype=picked.dtype, device=picked.device).masked_scatter(keep, picked)
    return per_token.sum(dim=1), keep.sum(dim=1)  # a plain row sum: deterministic, unlike a scatter-add


@contextlib.contextmanager
def head_only_at(model: nn.Module, keep: torch.Tensor):
    """Inside the block, `model(idx)` returns the logits (1, N, V) of the positions where `keep` (B, T) is True.

    A forward hook on the final norm hands the head only those hidden states; everything before the
    head (and under FSDP, Fabric's wrapper and the root module's hooks) runs as usual.
    """
    from litllm.train.fabric import unwrap

    def select(module, args, output):  # (B, T, C) -> (1, N, C)
        return output[keep].unsqueeze(0)

    handle = unwrap(model).norm_f.register_forward_hook(select)
    try:
        yield
    finally:
        handle.remove()


def pair_losses(
    settings: PreferenceSettings,
    logps: torch.Tensor,
    lengths: torch.Tensor,
    ref_logps: Optional[torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (B,) and per-pair metrics {name: (B,)} from the 2B rows' log-probs (and reference's)."""
    s = settings
    chosen, rejected = logps.chunk(2)  # (B,) each
    n_chosen, n_rejected = (n.clamp(min=1).to(logps.dtype) for n in lengths.chunk(2))
    if s.loss == "simpo":
        chosen, rejected = chosen / n_chosen, rejected / n_rejected  # TRL's CPOTrainer logs these averages
        chosen_rewards, rejected_rewards = s.beta * chosen.detach(), s.beta * rejected.detach()
        logits = s.beta * (chosen - rejected) - s.gamma
        losses = -(1 - s.label_smoothing) * F.logsigmoid(logits) - s.label_smoothing * F.logsigmoid(-logits)
    else:
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        chosen_rewards, rejected_rewards = s.beta * chosen_ratio.detach(), s.beta * rejected_ratio.detach()
        if s.loss == "dpo":
            logits = s.beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - s.label_smoothing) * F.logsigmoid(logits) - s.label_smoothing * F.logsigmoid(-logits)
        else:  # ipo, on per-token averages (TRL, confirmed with the IPO authors)
            losses = (chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * s.beta)) ** 2
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(logps.dtype),
        "logps/chosen": chosen.detach(),
        "logps/rejected": rejected.detach(),
    }
    return losses, metrics


Reference = Callable[[nn.Module, dict[str, torch.Tensor], int], torch.Tensor]


def adapters_off_reference(model: nn.Module, batch: dict[str, torch.Tensor], ignore_index: int) -> torch.Tensor:
    """The base model's log-probs: the policy itself with every LoRA/adapter update switched off."""
    from litllm.lora import disable_adapters

    with torch.no_grad(), disable_adapters(model):
        return reply_logps(model, batch, ignore_index)[0]


def frozen_reference(reference: nn.Module, autocast: Callable = contextlib.nullcontext) -> Reference:
    """Log-probs of a frozen copy of the initial model (full finetuning without precomputed log-probs).

    autocast: the run's precision context (`fabric.autocast`), which a module outside Fabric's wrapper needs."""

    def ref_logps(model: nn.Module, batch: dict[str, torch.Tensor], ignore_index: int) -> torch.Tensor:
        with torch.no_grad(), autocast():
            return reply_logps(reference, batch, ignore_index)[0]

    return ref_logps


def precomputed_reference(model: nn.Module, batch: dict[str, torch.Tensor], ignore_index: int) -> torch.Tensor:
    if "ref_logps" not in batch:
        raise LitLLMError("the batch has no precomputed reference log-probs (ref_logps)")
    return batch["ref_logps"]


def preference_loss(settings: PreferenceSettings, reference: Optional[Reference]) -> Callable:
    """`Method.loss` of preference tuning: (sum of pair losses, pair count, {metric: sum over pairs})."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor], ignore_index: int):
        logps, lengths = reply_logps(model, batch, ignore_index)
        ref = None if settings.loss == "simpo" else reference(model, batch, ignore_index).to(logps.dtype)
        losses, metrics = pair_losses(settings, logps, lengths, ref)
        count = torch.tensor(losses.numel(), device=losses.device)
        return losses.sum(), count, {name: value.sum() for name, value in metrics.items()}

    return loss


def preference_method(method, settings: PreferenceSettings, fabric, data, tokenizer, *, checkpoint_dir: Path,
                      out_dir: Path, precompute: bool, micro_batch_size: int, max_seq_length: int,
                      compute_dtype: torch.dtype):
    """`method` (a LoRA or full finetuning `litllm.train.loop.Method`) with the preference loss of `settings` and its
    reference: none (SimPO), log-probs precomputed once (`precompute`, cached in out_dir), the same model with
    its LoRA switched off (LoRA), or a frozen copy of the initial model in `checkpoint_dir` (full)."""
    from dataclasses import replace

    def initial_model() -> nn.Module:
        from litllm.model import GPT

        reference = GPT.from_checkpoint(checkpoint_dir, device=fabric.device, dtype=compute_dtype).eval()
        return reference.requires_grad_(False)

    if settings.loss == "simpo":
        reference = None  # reference-free
    elif precompute:
        precompute_reference(fabric, data, tokenizer, initial_model, out_dir, micro_batch_size, max_seq_length,
                             weights=Path(checkpoint_dir) / "lit_model.safetensors")
        reference = precomputed_reference
    elif method.name == "lora":
        reference = adapters_off_reference
    else:
        reference = frozen_reference(initial_model(), fabric.autocast)
    return replace(method, name=f"{settings.loss}_{method.name}", loss=preference_loss(settings, reference))


# ---------------------------------------------------------------------- precomputed reference log-probs
@torch.no_grad()
def compute_reference_logps(model: nn.Module, data, device, batch_size: int, autocast: Callable) -> dict[str, torch.Tensor]:
    """{split: (N, 2) reference [chosen, rejected] log-probs} of a set-up `Preference` data module, in dataset order."""
    from torch.utils.data import DataLoader

    model.eval()
    out = {}
    for split, dataset in data.datasets().items():
        rows = []
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=data.collate()):
            batch = {k: v.to(device) for k, v in batch.items() if k != "ref_logps"}
            with autocast():
                logps = reply_logps(model, batch, data.ignore_index)[0].float().cpu()
            rows.append(torch.stack(logps.chunk(2), dim=1))  # (b, 2)
        out[split] = torch.cat(rows)
    return out


def reference_key(data, weights: Optional[Path], precision: str) -> torch.Tensor:
    """What precomputed reference log-probs depend on, as a SHA-256 digest (uint8 (32,)): the initial
    model's weights (`weights_identity`), every pair's token ids in every split (which the data, the
    tokenizer, the prompt style and max_seq_length's truncation decide) and the run's precision."""
    import hashlib

    digest = hashlib.sha256(b"litllm reference log-probs v2\0")
    digest.update(weights_identity(weights) if weights is not None else b"no weights file")
    digest.update(precision.encode())
    for split, dataset in data.datasets().items():
        digest.update(f"\0{split}:{len(dataset.samples)}\0".encode())
        for sample in dataset.samples:
            for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
                ids = sample[name].to(torch.int64).contiguous()
                digest.update(len(ids).to_bytes(8, "little"))
                digest.update(ids.numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def weights_identity(path: Path) -> bytes:
    """Cheap identity of a weights file: size, modification time, the safetensors header (names, shapes,
    dtypes) and 16 blocks of 64 KiB spread over the tensor data, hashed. Another checkpoint (a different
    file) differs in its modification time at least; a copy of the same one only costs a recomputation."""
    import hashlib

    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        digest.update(f.read(min(header_len, stat.st_size)))
        start = 8 + header_len
        span = max(stat.st_size - start - _SAMPLE_BYTES, 0)
        for i in range(_SAMPLES):
            f.seek(start + span * i // max(_SAMPLES - 1, 1))
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.digest()


def precompute_reference(fabric, data, tokenizer, initial_model: Callable[[], nn.Module], out_dir: Path,
                         micro_batch_size: int, max_seq_length: int, weights: Optional[Path] = None) -> None:
    """One pass of the initial model over every pair before training; cached as out_dir/reference_logps.safetensors.

    A later run with the same out_dir (a resume) reuses the cache when its `reference_key` matches: the
    same initial weights (`weights`, its `lit_model.safetensors`), pairs, tokenization and precision;
    anything else recomputes it. The reference model lives only for this pass, so training holds no
    second copy. Computed on global rank 0; every rank reads it.
    """
    from litllm.model_folder import read_safetensors, save_model_weights

    path = Path(out_dir) / REFERENCE_FILE
    data.connect(tokenizer, batch_size=micro_batch_size, max_seq_length=max_seq_length)
    data.setup()
    if fabric.global_rank == 0:
        key = reference_key(data, weights, str(getattr(fabric.strategy.precision, "precision", "?")))
        cached = read_safetensors(path) if path.is_file() else None
        if cached is None or not torch.equal(cached.get("key", torch.empty(0, dtype=torch.uint8)), key):
            stale = "" if cached is None else f" (the cached ones in {path} are for another model, data or precision)"
            fabric.print(f"Computing the reference log-probs of {sum(len(d) for d in data.datasets().values())} "
                         f"pairs{stale}")
            reference = initial_model()
            logps = compute_reference_logps(reference, data, fabric.device, micro_batch_size, fabric.autocast)
            del reference
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model_weights({**logps, "key": key}, path)
        else:
            fabric.print(f"Reusing the reference log-probs in {path}")
    fabric.barrier()
    cached = read_safetensors(path)
    data.attach_reference({split: cached[split] for split in data.datasets()})
