"""Settings shared by `litllm pretrain` and every `litllm finetune_*`.

`TrainArgs` and `EvalArgs` are plain dataclasses: jsonargparse turns their fields into dotted flags
(`--train.micro_batch_size 2`, `--eval.interval 100`) and the attribute docstrings into help.
`RunArgs` holds the flags every training command shares (`--devices 8`, `--seed`, `--resume`, ...): a
command's job declares it `run: RunArgs = flat("", RunArgs)` (`litllm.flags`), so they are flat flags,
documented here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from litllm.errors import LitLLMError


AUTO_GLOBAL_BATCH = 16
"""An unset --train.global_batch_size: at most this many samples per step..."""
AUTO_MIN_EPOCH_STEPS = 20
"""...and few enough that one epoch makes at least this many optimizer steps (a small data set still learns)."""
AUTO_WARMUP = (0.1, 100)
"""An unset warmup: this fraction of the run's optimizer steps, at most this many."""


@dataclass
class TrainArgs:
    """How long and how to train: batch sizes, budget, learning-rate schedule, clipping, saving."""

    save_interval: Optional[int] = 1000
    """Save a training checkpoint `out_dir/step-XXXXXXXX/` every this many optimizer steps (None: only at the end)."""
    log_interval: int = 1
    """Log metrics every this many optimizer steps."""
    global_batch_size: Optional[int] = 64
    """Samples per optimizer step, summed over every device and node and every accumulation micro-step
    (None: sized for the data, up to 16, fewer on a small data set so that an epoch makes at least 20 steps)."""
    micro_batch_size: int = 4
    """Samples per forward/backward pass on one device."""
    lr_warmup_steps: Optional[int] = 100
    """Optimizer steps of linear warmup from 0 to the optimizer's lr (capped at the run's length; None, with
    lr_warmup_fraction unset too: 10% of the run's steps, at most 100)."""
    lr_warmup_fraction: Optional[float] = None
    """Warmup as a fraction of the run's optimizer steps (use instead of lr_warmup_steps)."""
    epochs: Optional[int] = None
    """Passes over the training data (the budget is the smallest of epochs, max_tokens and max_steps that are set)."""
    max_tokens: Optional[int] = None
    """Stop after this many training tokens (global_batch_size x max_seq_length per step)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps."""
    max_seq_length: Optional[int] = None
    """Tokens per training sample (longer samples are cut; None: the model's block_size)."""
    min_lr: float = 0.0
    """The cosine schedule decays the learning rate to this value at the last step."""
    max_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""
    max_nonfinite_steps: int = 5
    """Skip an optimizer step whose loss or gradient norm is NaN/inf (its gradients are zeroed); stop the run
    with an error, saving nothing more, after this many such steps in a row (resume from the last checkpoint)."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for MFU (None: looked up for known GPUs; on CPU only achieved FLOP/s is logged)."""
    router_aux_loss_coef: Optional[float] = None
    """MoE models: weight of the router load-balancing loss added to the LM loss while training, logged apart
    as `router_aux_loss` (None: the checkpoint's `router_aux_loss_coef`, 0 where it has none)."""
    state_dict_type: Literal["full", "sharded"] = "full"
    """Step checkpoints under FSDP: "full" gathers weights and optimizer state to rank 0 (one file each);
    "sharded" has every rank write its own shards with torch.distributed.checkpoint (faster, no rank-0
    memory peak; resumable on any device count, converted by `litllm convert_pretrained_checkpoint`).
    `final/` is always a full model folder."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "log_interval", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise LitLLMError(f"--train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("global_batch_size", "save_interval", "epochs", "max_tokens", "max_steps", "max_seq_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LitLLMError(f"--train.{name} must be >= 1 (or unset), got {value}")
        if self.lr_warmup_fraction is not None:
            if not 0 <= self.lr_warmup_fraction <= 1:
                raise LitLLMError(f"--train.lr_warmup_fraction must be in [0, 1], got {self.lr_warmup_fraction}")
            if self.lr_warmup_steps:
                raise LitLLMError("set only one of --train.lr_warmup_steps and --train.lr_warmup_fraction")

    def per_device_batch_size(self, world_size: int) -> int:
        """Samples each device processes per optimizer step (unset global batch: the most it may be)."""
        if self.global_batch_size is None:
            return max(self.micro_batch_size, AUTO_GLOBAL_BATCH // world_size // self.micro_batch_size * self.micro_batch_size)
        if self.global_batch_size % world_size:
            raise LitLLMError(
                f"--train.global_batch_size ({self.global_batch_size}) must be divisible by the number of "
                f"devices x nodes ({world_size})"
            )
        return self.global_batch_size // world_size

    def gradient_accumulation_iters(self, world_size: int) -> int:
        """Micro-batches each device accumulates before an optimizer step."""
        per_device = self.per_device_batch_size(world_size)
        if per_device % self.micro_batch_size:
            raise LitLLMError(
                f"--train.global_batch_size ({self.global_batch_size}) must be divisible by devices x nodes "
                f"({world_size}) x --train.micro_batch_size ({self.micro_batch_size})"
            )
        return per_device // self.micro_batch_size

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of `total_steps`."""
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * total_steps)
        if self.lr_warmup_steps is None:
            fraction, most = AUTO_WARMUP
            return min(int(fraction * total_steps), most)
        return min(self.lr_warmup_steps, total_steps)

    def total_steps(self, seq_length: int, batches_per_epoch: Optional[int], accumulation: int,
                    global_batch: Optional[int] = None) -> int:
        """The run's length in optimizer steps: the smallest budget that is set (one epoch if none is).

        `batches_per_epoch` is the number of micro-batches one device sees per epoch (None: unknown);
        `global_batch` the samples per step the run makes (default: global_batch_size, or its upper bound if unset).
        """
        global_batch = global_batch or self.global_batch_size or AUTO_GLOBAL_BATCH
        budgets = []
        if self.max_steps is not None:
            budgets.append(self.max_steps)
        if self.max_tokens is not None:
            budgets.append(self.max_tokens // (global_batch * seq_length))
        epochs = self.epochs if (self.epochs is not None or budgets) else 1
        if epochs is not None:
            if batches_per_epoch is None:
                raise LitLLMError(
                    "--train.epochs needs a training set of known length; set --train.max_tokens or --train.max_steps"
                )
            budgets.append(epochs * batches_per_epoch // accumulation)
        return max(1, min(budgets))


@dataclass
class EvalArgs:
    """When and how much to validate."""

    interval: int = 600
    """Validate every this many optimizer steps."""
    max_iters: int = 100
    """Validation batches per device (the whole validation set when it is shorter)."""
    initial_validation: bool = False
    """Validate before the first step."""
    final_validation: bool = True
    """Validate after the last step."""
    max_new_tokens: Optional[int] = None
    """Tokens to generate from a validation prompt at each validation (finetuning; None: no sample)."""

    def __post_init__(self) -> None:
        if self.interval < 1 or self.max_iters < 1:
            raise LitLLMError("--eval.interval and --eval.max_iters must be >= 1")


@dataclass
class LoggerArgs:
    """How a run is named and grouped in W&B, MLflow and TensorBoard (`--logger.project team-x`)."""

    project: Optional[str] = None
    """W&B project, MLflow experiment (None: `litllm`)."""
    run_name: Optional[str] = None
    """The run's display name (None: the name of out_dir's folder)."""
    group: Optional[str] = None
    """Related runs: W&B group, MLflow tag `group` (None: `<method>-<model name>`, e.g. `lora-pythia-160m`)."""
    tags: list[str] = field(default_factory=list)
    """Labels, e.g. `--logger.tags '[baseline, lr=3e-4]'`: W&B tags; MLflow tags (`key=value`, or a bare label set to `true`)."""


@dataclass
class RunArgs:
    """Where and how a training command runs: the flags `pretrain` and every `finetune_*` share."""

    devices: Union[int, str] = 1
    """Devices per node (`auto`: every visible GPU, or 1 CPU process)."""
    num_nodes: int = 1
    """Number of nodes (with SLURM, launch with `srun`)."""
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"
    """`auto` (one device: single; more: fsdp), `single`, `ddp` or `fsdp` (FSDP2, Block-wise shards; with
    `--quantize`, everything but the packed quantized base, which every device holds whole)."""
    accelerator: Literal["auto", "cpu", "cuda", "gpu"] = "auto"
    """`auto`, `cuda` or `cpu` (e.g. `--accelerator cpu --devices 2` runs 2 CPU processes)."""
    precision: Optional[str] = None
    """`bf16-mixed` (default on GPUs), `32-true` (default on CPUs), `bf16-true`, `16-mixed`."""
    logger_name: Literal["csv", "tensorboard", "wandb", "mlflow"] = "csv"
    """`csv`, `tensorboard`, `wandb` (WANDB_MODE=offline works without a network) or `mlflow` (MLFLOW_TRACKING_URI;
    default: a file store in out_dir/logs/mlflow). out_dir/logs/csv/metrics.csv is written in every case."""
    logger: LoggerArgs = field(default_factory=LoggerArgs)
    """Naming and grouping of the run in the logger (see `LoggerArgs`)."""
    seed: int = 42
    """Random seed (model or method init, data order, dropout); restored exactly on resume."""
    resume: Union[bool, Literal["auto"], Path] = False
    """`auto`: continue from the newest complete checkpoint in out_dir (or start fresh); a checkpoint
    path; false: start fresh."""
    compile: bool = False
    """Compile each transformer block with `torch.compile`."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (saves memory)."""
    fast_dev_run: Union[bool, int] = False
    """Check the recipe before a long job: `true` (4 optimizer steps) or N steps (>= 2) of the real data, model
    and strategy, with a checkpoint saved halfway and resumed from, 1 validation batch and the final folder,
    all in a temporary folder (out_dir is never written); prints the checks, tokens/s and peak memory per device."""
