"""The one training loop behind `litllm pretrain` and every `litllm finetune_*`.

forward -> loss -> accumulate -> clip -> step -> schedule -> log -> validate -> checkpoint.

A training *method* (pretraining, full finetuning, LoRA, QLoRA, adapters) differs only in three
things, passed in as a `Method`: how the model is transformed before setup, which parameters
train, and what the final model folder holds. Nothing here knows which method runs.

Loss normalisation: every optimizer step minimises the mean cross-entropy over all label tokens
of the *global* batch (every device, every micro-batch), so a run gives the same gradients
whatever its split into devices x micro-batches x accumulation steps, padded batches included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

import torch
import torch.nn as nn

from litllm.errors import LitLLMError
from litllm.train.args import EvalArgs, TrainArgs
from litllm.train.preemption import StopOnSignal

Resume = Union[bool, Literal["auto"], Path, str]


def _keep_model(model: nn.Module) -> nn.Module:
    return model


def _train_all(name: str, param: nn.Parameter) -> bool:
    return True


def _same_key(name: str) -> str:
    return name


def _export_as_is(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return state_dict


@dataclass
class Method:
    """What distinguishes one way of training from another. The loop is the same for all.

    Pretraining and full finetuning use the defaults. LoRA: `transform` adds the low-rank
    factors, `trainable` selects them, `export` merges them into the base weights.
    """

    name: str = "full"
    transform: Callable[[nn.Module], nn.Module] = _keep_model
    """Applied to the built GPT before Fabric setup (add LoRA/adapters, quantize). Modules it adds
    must define `reset_parameters()` (they may be created on the meta device)."""
    trainable: Callable[[str, nn.Parameter], bool] = _train_all
    """Which parameters the optimizer updates, by qualified name; the others are frozen. Training
    checkpoints hold only these (frozen weights are re-read from `initial_weights` on resume)."""
    export: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = _export_as_is
    """Full trained state dict -> the weights of the final model folder (`lit_model.safetensors`)."""
    base_key: Callable[[str], str] = _same_key
    """Name of a base-checkpoint weight in the transformed model (LoRA/adapter-v2 wrap `attn.qkv` as
    `attn.qkv.base`); used when the initial weights are loaded after `transform` (meta-device init)."""


@dataclass
class TrainResult:
    """What a finished `run` reports (on every rank)."""

    step: int
    """Optimizer steps done in total (including those before a resume)."""
    losses: dict[int, float] = field(default_factory=dict)
    """Global-batch training loss at every logged step of this process's run."""
    val_loss: Optional[float] = None
    """The last validation loss."""
    val_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by step."""
    tokens_seen: int = 0
    final_dir: Optional[Path] = None


def run(
    fabric,
    model: nn.Module,
    method: Method,
    data,
    tokenizer,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer: Any,
    out_dir: Path,
    resume: Resume = False,
    *,
    hparams: Optional[dict[str, Any]] = None,
    initial_weights: Optional[Path] = None,
    model_files_from: Optional[Path] = None,
    extra_files: Optional[dict[str, str]] = None,
    logger=None,
    seed: int = 42,
    compile: bool = False,
    activation_checkpointing: bool = False,
    after_validation: Optional[Callable[[Any, nn.Module, int], None]] = None,
) -> TrainResult:
    """Train `model` with `method` on `data` and write checkpoints into `out_dir`.

    Call it on every rank after `fabric.launch()` (see `litllm.train.fabric.make_fabric`).

    Args:
        fabric: a launched `lightning.Fabric`.
        model: a `GPT`, not set up yet: built on `fabric.device`, or on the meta device under FSDP
            (then materialised at setup with `reset_parameters()`).
        method: the three method-specific inputs (transform, trainable, export).
        data: a DataModule (`connect`, `prepare_data`, `setup`, `train_dataloader`, `val_dataloader`);
            batches are {"input_ids": (B, T), "labels": (B, T)} with labels already shifted (-100 = ignore).
            `run` connects it (micro_batch_size, max_seq_length), prepares it on global rank 0 and sets it up.
        tokenizer: a `litllm.tokenizer.Tokenizer`; its files are saved with every checkpoint.
        train: batch sizes, budget, schedule, clipping, saving.
        eval: validation interval and size.
        optimizer: a torch.optim class name ("AdamW"), {"class_path": ..., "init_args": {...}}, or the
            value jsonargparse gives for the CLI type `litllm.train.optimizer.OptimizerSpec`.
        out_dir: where `step-XXXXXXXX/` checkpoints, `final/`, logs and the loss curve go.
        resume: False; "auto" (newest complete checkpoint in out_dir, or a fresh start); a checkpoint path.
        hparams: the command's arguments, saved as `hyperparameters.yaml` in every checkpoint.
        initial_weights: a `lit_model.safetensors` to start from (finetuning, continued pretraining).
            Loaded before `method.transform` when the model is materialised, after setup when it is on meta.
        model_files_from: a folder whose tokenizer/prompt files are copied into every checkpoint
            (default: `tokenizer.checkpoint_dir`).
        extra_files: {file name: text} written into every checkpoint and `final/` (e.g. prompt_style.yaml).
        logger: a `litllm.train.loggers` logger (rank 0 logs); None: no metric logging.
        seed: seeds model init, data order and dropout; restored exactly on resume.
        compile: `torch.compile` each transformer block.
        activation_checkpointing: recompute each block's activations in the backward pass.
        after_validation: called as `after_validation(fabric, model, step)` after each validation
            (finetuning uses it to print a sample generation).

    Returns:
        A `TrainResult`. `final/` in out_dir is a model folder (`lit_model.safetensors`,
        `model_config.yaml`, tokenizer files) that generate, finetune and convert_from_litllm take.
    """
    from litllm.train import checkpoints as ckpt
    from litllm.train.fabric import prepare_model
    from litllm.train.flops import Throughput
    from litllm.train.optimizer import build_optimizer
    from litllm.train.schedule import lr_at

    out_dir = Path(out_dir)
    config = model.config
    world_size = fabric.world_size
    accumulation = train.gradient_accumulation_iters(world_size)
    seq_length = train.max_seq_length or config.block_size
    if seq_length > config.block_size:
        raise LitLLMError(f"--train.max_seq_length ({seq_length}) exceeds the model's block_size ({config.block_size})")
    if tokenizer is not None and tokenizer.vocab_size > config.padded_vocab_size:
        raise LitLLMError(
            f"the tokenizer's vocabulary ({tokenizer.vocab_size} tokens, {tokenizer.checkpoint_dir}) exceeds the "
            f"model's embedding table ({config.padded_vocab_size} rows): use a model with vocab_size >= "
            f"{tokenizer.vocab_size} or a smaller tokenizer"
        )
    resume_dir = ckpt.resolve_resume(resume, out_dir, config)  # validates before anything is written

    # ---- data (prepared once on global rank 0, set up everywhere)
    data.connect(tokenizer, batch_size=train.micro_batch_size, max_seq_length=seq_length)
    if fabric.global_rank == 0:
        data.prepare_data()
    fabric.barrier()
    data.setup()
    stream = BatchStream(fabric, data.train_dataloader(), seed)
    val_loader = _setup_val_loader(fabric, data.val_dataloader())
    total_steps = train.total_steps(seq_length, stream.batches_per_epoch, accumulation)
    warmup_steps = train.warmup_steps(total_steps)

    # ---- model and optimizer
    fabric.seed_everything(seed)
    model = prepare_model(
        fabric, model, method, initial_weights, compile=compile, activation_checkpointing=activation_checkpointing
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LitLLMError(f"method {method.name!r} leaves no parameter to train")
    opt = fabric.setup_optimizers(build_optimizer(optimizer, trainable))
    base_lrs = [group["lr"] for group in opt.param_groups]
    state = {"step": 0, "tokens": 0, "epoch": 0, "batches_in_epoch": 0}
    if resume_dir is not None:
        restored = ckpt.load_training_checkpoint(fabric, resume_dir, model, opt, method)
        state.update(restored["counters"])
        saved_world = restored.get("world_size", world_size)
        if saved_world == world_size:
            stream.load_state_dict(restored["data"], state)
        else:  # weights and optimizer reshard freely; a data position is per rank layout
            stream.epoch = state["epoch"]
            fabric.print(
                f"Warning: {resume_dir} was saved by {saved_world} processes, this run has {world_size}: the "
                f"data order restarts at the beginning of epoch {state['epoch']} (some samples repeat)"
            )
        ckpt.set_rng_state(restored["rng"])
        fabric.print(f"Resuming from {resume_dir} at step {state['step']}")

    writer = ckpt.CheckpointWriter(
        fabric, out_dir, model, config, method, tokenizer_dir=model_files_from or _tokenizer_dir(tokenizer),
        hparams=hparams or {}, extra_files=extra_files or {}, state_dict_type=train.state_dict_type,
    )
    if logger is not None and fabric.global_rank == 0:
        logger.log_hyperparams(ckpt.to_plain(hparams or {}))
    throughput = Throughput(fabric, config, seq_length, train.peak_flops, trainable_fraction=_trainable_fraction(model))
    result = TrainResult(step=state["step"])
    fabric.print(
        f"Training {total_steps} steps ({accumulation} accumulation x {train.micro_batch_size} micro-batch x "
        f"{world_size} devices = {train.global_batch_size} samples of {seq_length} tokens per step), "
        f"warmup {warmup_steps}, {sum(p.numel() for p in trainable):,} trainable parameters"
    )

    if eval.initial_validation and state["step"] == 0 and val_loader is not None:
        result.val_loss = result.val_losses[state["step"]] = validate(fabric, model, val_loader, eval.max_iters)
        _log(fabric, logger, {"val_loss": result.val_loss}, state["step"])

    progress = _progress_bar(fabric, total_steps, state["step"])
    running = torch.zeros(3, device=fabric.device, dtype=torch.float64)  # loss sum, label tokens, input tokens

    def flush() -> Optional[float]:
        """Sum the counters since the last flush over every rank; returns the global-batch loss."""
        totals = fabric.all_reduce(running.clone(), reduce_op="sum")
        running.zero_()
        state["tokens"] += int(totals[2].item())
        return float(totals[0] / totals[1]) if totals[1] > 0 else None

    saved_at = state["step"]
    throughput.start(state)
    stop = StopOnSignal()  # preemption hook: SIGUSR1/SIGTERM -> checkpoint at the next step boundary
    while state["step"] < total_steps:
        micro_batches = stream.next_window(accumulation)
        if not micro_batches:
            break  # the data ran out (only with a finite loader and an unset budget)
        # every param group follows the first group's schedule, keeping its own lr ratio
        lr = lr_at(state["step"], base_lrs[0], min(train.min_lr, base_lrs[0]), warmup_steps, total_steps)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * base / base_lrs[0] if base_lrs[0] else base

        step_counts, grad_norm = train_step(fabric, model, opt, micro_batches, train.max_norm)
        running += step_counts
        state["step"] += 1
        stream.update_counters(state)

        if state["step"] % train.log_interval == 0 or state["step"] == total_steps:
            loss = flush()
            result.losses[state["step"]] = loss
            metrics = {"loss": loss, "lr": opt.param_groups[0]["lr"], "tokens": state["tokens"], "epoch": state["epoch"]}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)  # before clipping, of this step
            metrics.update(throughput.update(state))
            _log(fabric, logger, metrics, state["step"])
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics.get('tokens_per_sec', 0):.0f}")
        progress.update(1)

        if val_loader is not None and state["step"] % eval.interval == 0 and state["step"] < total_steps:
            result.val_loss = result.val_losses[state["step"]] = validate(fabric, model, val_loader, eval.max_iters)
            _log(fabric, logger, {"val_loss": result.val_loss}, state["step"])
            if after_validation is not None:
                after_validation(fabric, model, state["step"])
            throughput.start(state)  # validation time isn't training throughput
        if train.save_interval is not None and state["step"] % train.save_interval == 0:
            flush_loss = flush()  # the checkpoint's token count must be exact
            if flush_loss is not None:
                result.losses.setdefault(state["step"], flush_loss)
            writer.save_step(opt, state, stream.state_dict())
            saved_at = state["step"]
            throughput.start(state)
        if stop.agreed(fabric):  # preemption hook (collective): every rank stops after this same step
            if saved_at != state["step"]:
                flush()  # the checkpoint's token count must be exact
                writer.save_step(opt, state, stream.state_dict())
            stop.exit(fabric, state["step"])  # raises SystemExit(REQUEUE_EXIT_CODE)
    progress.close()
    flush()
    result.step, result.tokens_seen = state["step"], state["tokens"]

    if eval.final_validation and val_loader is not None:
        result.val_loss = result.val_losses[state["step"]] = validate(fabric, model, val_loader, eval.max_iters)
        _log(fabric, logger, {"val_loss": result.val_loss}, state["step"])
        if after_validation is not None:
            after_validation(fabric, model, state["step"])
    if train.save_interval is not None and saved_at != state["step"]:
        writer.save_step(opt, state, stream.state_dict())
    result.final_dir = writer.save_final()
    stop.restore()  # preemption hook: a signal after the last step needs no requeue
    fabric.print(f"Saved the final model to {result.final_dir}")
    if fabric.global_rank == 0:
        from litllm.train.loggers import loss_history, plot_loss_curve

        png = plot_loss_curve(loss_history(logger, result.losses, result.val_losses), out_dir / "loss_curve.png")
        if png is not None:
            fabric.print(f"Loss curve: {png}")
        if logger is not None:
            logger.finalize()
    return result


# ---------------------------------------------------------------------- one optimizer step
def train_step(
    fabric, model, optimizer, micro_batches: list[dict], max_norm: Optional[float]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward/backward every micro-batch, then clip and step.

    Returns this rank's (loss sum, label tokens, input tokens) and the global gradient norm before
    clipping (None without clipping).

    Each micro-batch's mean loss is reweighted by its share of the global batch's label tokens, so
    the accumulated gradient is the gradient of the global token-mean loss (the all-reduce of DDP
    and FSDP averages over ranks, hence the x world_size).
    """
    counts = torch.tensor(
        [[int((b["labels"] != -100).sum()), b["input_ids"].numel()] for b in micro_batches], dtype=torch.float64
    )  # (n_micro, [label tokens, input tokens])
    local = counts.sum(0)
    global_labels = fabric.all_reduce(local[0].clone().to(fabric.device), reduce_op="sum").clamp(min=1)
    loss_sum = torch.zeros((), device=fabric.device, dtype=torch.float64)
    for i, batch in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        input_ids = batch["input_ids"].to(fabric.device, non_blocking=True)
        labels = batch["labels"].to(fabric.device, non_blocking=True)
        with fabric.no_backward_sync(model, enabled=not is_last):
            mean_loss = model(input_ids, targets=labels)
            weight = (counts[i, 0].item() * fabric.world_size / global_labels).to(mean_loss.dtype)
            fabric.backward(mean_loss * weight)
        loss_sum += mean_loss.detach().double() * counts[i, 0].item()
    grad_norm = None
    if max_norm is not None:
        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack([loss_sum, local[0].to(loss_sum.device), local[1].to(loss_sum.device)]), grad_norm


@torch.no_grad()
def validate(fabric, model, val_loader, max_iters: int) -> float:
    """Token-mean validation loss over up to `max_iters` batches per rank, averaged across ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, device=fabric.device, dtype=torch.float64)
    for i, batch in enumerate(val_loader):
        if i >= max_iters:
            break
        labels = batch["labels"].to(fabric.device)
        n = (labels != -100).sum()
        loss = model(batch["input_ids"].to(fabric.device), targets=labels)
        totals += torch.stack([loss.double() * n, n.double()])
    totals = fabric.all_reduce(totals, reduce_op="sum")
    model.train(was_training)
    if totals[1] == 0:
        return float("nan")
    return float(totals[0] / totals[1])


# ---------------------------------------------------------------------- data order
class BatchStream:
    """Endless stream of training micro-batches across epochs, with an exactly resumable position.

    litdata `StreamingDataLoader`s save and restore their own state. Map-style DataLoaders are
    resumed by re-seeding the epoch's shuffle (seed + epoch) and skipping the batches already used.
    """

    def __init__(self, fabric, loader, seed: int) -> None:
        self.fabric = fabric
        self.seed = seed
        self.streaming = hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")
        if not self.streaming:
            # DistributedSampler for DDP/FSDP; batches are moved to the device in train_step
            loader = fabric.setup_dataloaders(loader, use_distributed_sampler=True, move_to_device=False)
            loader = getattr(loader, "_dataloader", loader)
        self.loader = loader
        try:
            self.batches_per_epoch: Optional[int] = len(loader)
        except TypeError:
            self.batches_per_epoch = None
        if self.batches_per_epoch == 0:
            raise LitLLMError("the training set yields no batch (is the data folder empty, or every sample too short?)")
        self.epoch = 0
        self.batches_in_epoch = 0
        self._iter: Optional[Iterator] = None
        self._skip = 0

    def _start_epoch(self) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler (seeded by Fabric), or the data module's own
            sampler.set_epoch(self.epoch)
        elif isinstance(sampler, torch.utils.data.RandomSampler):
            sampler.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self._iter = iter(self.loader)
        for _ in range(self._skip):  # resuming a map-style loader mid-epoch
            next(self._iter)
        self._skip = 0

    def next_window(self, n: int) -> list[dict]:
        """The next `n` micro-batches (fewer only when a finite loader ends for good)."""
        window = []
        empty_epochs = 0
        while len(window) < n:
            if self._iter is None:
                self._start_epoch()
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch += 1
                self.batches_in_epoch = 0
                empty_epochs += 1
                if empty_epochs > 1:
                    break
                continue
            empty_epochs = 0
            self.batches_in_epoch += 1
            window.append(batch)
        return window

    def update_counters(self, state: dict) -> None:
        state["epoch"], state["batches_in_epoch"] = self.epoch, self.batches_in_epoch

    def state_dict(self) -> dict:
        if self.streaming:
            return {"loader": self.loader.state_dict(), "epoch": self.epoch}
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, data_state: dict, counters: dict) -> None:
        self.epoch = data_state.get("epoch", counters.get("epoch", 0))
        if self.streaming:
            self.loader.load_state_dict(data_state["loader"])
        else:
            self.batches_in_epoch = data_state.get("batches_in_epoch", 0)
            self._skip = self.batches_in_epoch


def _setup_val_loader(fabric, loader):
    if loader is None:
        return None
    if hasattr(loader, "state_dict"):  # litdata handles its own distribution
        return loader
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=True, move_to_device=False)
    return getattr(loader, "_dataloader", loader)


# ---------------------------------------------------------------------- small helpers
def _tokenizer_dir(tokenizer) -> Optional[Path]:
    return getattr(tokenizer, "checkpoint_dir", None)


def _trainable_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)


def _log(fabric, logger, metrics: dict, step: int) -> None:
    if logger is not None and fabric.global_rank == 0:
        logger.log_metrics(metrics, step)


def _progress_bar(fabric, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc="train", unit="step", disable=fabric.global_rank != 0, dynamic_ncols=True,
        mininterval=1.0,
    )
