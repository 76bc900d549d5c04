"""The one training loop behind `litllm pretrain` and every `litllm finetune_*`.

forward -> loss -> accumulate -> clip -> step -> schedule -> log -> validate -> checkpoint.

    trainer = setup(fabric, model, method, data, tokenizer, train, eval, optimizer, out_dir, run)
    result = fit(trainer)

A training *method* (pretraining, full finetuning, LoRA, QLoRA, adapters, DPO/IPO/SimPO) is a `Method`:
how the model is transformed before setup, which parameters train, the loss, and what the final
model folder holds. Nothing here knows which method runs.

Loss normalisation: `Method.loss` returns a *sum* and the count it is summed over (label tokens by
default). Every optimizer step minimises the global sum divided by the global count (every device,
every micro-batch), so a run gives the same gradients whatever its split into devices x
micro-batches x accumulation steps, padded batches included. The division happens once per step,
on the accumulated gradients, so no count has to be known (or synced to the host) before backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

import torch
import torch.nn as nn

from litllm.errors import LitLLMError
from litllm.train.args import EvalArgs, RunArgs, TrainArgs
from litllm.train.nonfinite import NonFiniteGuard, zero_nonfinite_step
from litllm.train.preemption import StopOnSignal

Resume = Union[bool, Literal["auto"], Path, str]
Batch = dict[str, torch.Tensor]
LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
"""(loss sum, count, metrics): every metric is a sum over the same items as the count."""


def _keep_model(model: nn.Module) -> nn.Module:
    return model


def _train_all(name: str, param: nn.Parameter) -> bool:
    return True


def _no_change(model: nn.Module) -> None:
    pass


def _export_as_is(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return state_dict


def _no_outputs(folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
    return None


def token_cross_entropy(model: nn.Module, batch: Batch, ignore_index: int) -> LossOutput:
    """The default loss: next-token cross-entropy summed over the label tokens, and their count.

    Every batch key besides `input_ids` and `labels` (e.g. `input_pos`, RoPE positions per row) is passed to the model.
    """
    labels = batch["labels"]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    mean = model(batch["input_ids"], targets=labels, ignore_index=ignore_index, **extra)
    count = (labels != ignore_index).sum()  # stays on the device: no host sync
    # an MoE model in training adds its router load-balancing loss to `mean`; logged apart (litllm/model.py)
    aux = getattr(model, "router_aux_loss", None) if model.training else None
    return mean * count, count, ({"router_aux_loss": aux * count} if aux is not None else {})


@dataclass
class Method:
    """What distinguishes one way of training from another. The loop is the same for all.

    Pretraining and full finetuning use the defaults. LoRA: `transform` adds the low-rank
    factors, `trainable` selects them, `export` merges them into the base weights, and
    `write_outputs` adds `lit_lora.safetensors` to `final/`.
    """

    name: str = "full"
    transform: Callable[[nn.Module], nn.Module] = _keep_model
    """Applied to the built GPT before Fabric setup (add LoRA/adapters). Modules it adds
    must define `reset_parameters()` (they may be created on the meta device)."""
    trainable: Callable[[str, nn.Parameter], bool] = _train_all
    """Which parameters the optimizer updates, by qualified name; the others are frozen (`build_train_model`
    sets `requires_grad`, the one place that does). Training checkpoints hold only these (frozen weights are
    re-read from `initial_weights` on resume)."""
    after_freeze: Callable[[nn.Module], None] = _no_change
    """Applied once the parameters `trainable` rejects are frozen (QLoRA quantizes that frozen base)."""
    export: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = _export_as_is
    """Full trained state dict -> the weights of the final model folder (`lit_model.safetensors`)."""
    loss: Callable[[nn.Module, Batch, int], LossOutput] = token_cross_entropy
    """`loss(model, batch, ignore_index) -> (loss_sum, count, metrics)`, tensors on the batch's device.
    The step minimises sum(loss_sum) / sum(count) over the global batch; `metrics` ({name: sum over
    the counted items}) are logged as their global mean, in training and validation (`val_<name>`)."""
    extra_files: dict[str, str] = field(default_factory=dict)
    """{file name: text} written into every checkpoint and `final/` (e.g. prompt_style.yaml)."""
    write_outputs: Callable[[Path, dict[str, torch.Tensor]], None] = _no_outputs
    """`write_outputs(folder, state_dict)`: the method's own files of `final/` (LoRA: lit_lora.safetensors), from
    the full trained state dict; called on global rank 0 while `final/` is written, before it is renamed into place."""
    after_validation: Optional[Callable[[Any, nn.Module, int], None]] = None
    """Called as `after_validation(fabric, model, step)` after each validation (finetuning prints a sample reply)."""


def build_train_model(
    config, method: Method, activation_checkpointing: bool = False, model: Optional[nn.Module] = None
) -> nn.Module:
    """The model a run trains: GPT(config) (or `model`), the method's transform, frozen parameters (then
    `method.after_freeze`), activation checkpointing. Pure (no Fabric, no files), so it also runs on the meta device and
    under `torch._subclasses.FakeTensorMode` (memory estimates)."""
    if model is None:
        from litllm.model import GPT

        model = GPT(config)
    model = method.transform(model)
    for name, param in model.named_parameters():
        param.requires_grad_(bool(method.trainable(name, param)))
    method.after_freeze(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    return model


def prepare_model(
    fabric,
    model: nn.Module,
    method: Method,
    initial_weights: Optional[Path] = None,
    compile: bool = False,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Load initial weights, build the train model (`build_train_model`), and set it up with Fabric.

    Returns the Fabric-wrapped model; `unwrap(model)` gives the module whose state dict is saved.
    """
    from litllm.model_folder import load_full_state_dict, load_model_weights, model_state_dict, read_safetensors
    from litllm.train.fabric import materialize, unwrap, uses_fsdp

    base_keys = set(model_state_dict(model))
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and not uses_fsdp(fabric):  # only FSDP materialises after sharding
        materialize(model, fabric.device)
        on_meta = False
    if initial_weights is not None and not on_meta:
        dtype = next(model.parameters()).dtype
        load_model_weights(model, initial_weights, device=fabric.device, dtype=dtype)
    model = build_train_model(model.config, method, activation_checkpointing, model=model)
    if compile:
        for block in model.blocks:
            block.compile()
    model = fabric.setup_module(model)
    if initial_weights is not None and on_meta:
        base_key = wrapped_key(unwrap(model))
        weights = {base_key(k): v for k, v in read_safetensors(initial_weights).items()}
        required = {base_key(k) for k in base_keys}
        load_full_state_dict(unwrap(model), weights, required=required, source=initial_weights)
    return model


def wrapped_key(model: nn.Module) -> Callable[[str], str]:
    """Base-checkpoint weight name -> its name in the transformed `model`, where a method may have wrapped a
    Linear, keeping it as the wrapper's `base` child (LoRA, adapter v2: `attn.qkv.weight` -> `attn.qkv.base.weight`)."""
    from litllm.train.fabric import clean_name

    wrapped = {clean_name(path) for path, module in model.named_modules()
               if path and isinstance(getattr(module, "base", None), nn.Module)}

    def base_key(name: str) -> str:
        module, _, param = name.rpartition(".")
        return f"{module}.base.{param}" if module in wrapped else name

    return base_key


@dataclass
class TrainResult:
    """What a finished `fit` reports (on every rank)."""

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


@dataclass
class Trainer:
    """Everything `fit` needs, as `setup` built it (on every rank)."""

    fabric: Any
    model: nn.Module
    """Set up with Fabric (wrapped); `litllm.train.fabric.unwrap(model)` is the GPT."""
    method: Method
    optimizer: Any
    stream: "BatchStream"
    val_loader: Optional[Any]
    writer: Any
    """The run's `litllm.train.checkpoints.CheckpointWriter`."""
    train: TrainArgs
    eval: EvalArgs
    out_dir: Path
    seq_length: int
    """Tokens per sample the run is sized for (FLOPs, token budget, RoPE cache)."""
    accumulation: int
    """Micro-batches per device per optimizer step."""
    total_steps: int
    warmup_steps: int
    ignore_index: int
    """The data module's label of positions without a loss."""
    batch_unit: str
    """What a batch row is: "samples", or "packed rows" (several samples each) with `--data.packing`."""
    state: dict[str, int]
    """step, tokens, epoch, batches_in_epoch: saved in checkpoints, restored on resume."""
    base_lrs: list[float]
    logger: Any = None
    dev_run: Any = None
    """A `litllm.train.fast_dev_run.DevRun` with `--fast_dev_run` (None: a normal run)."""
    out_dir_held: Optional[frozenset[str]] = None
    """The names out_dir held before setup wrote anything (None: it did not exist): a run that fails before its first
    step removes its `logs` only where they were not there before (`_remove_unfinished_output`)."""


RESOLVE_HERE = object()
"""`setup(resume_dir=...)` unset: resolve `run.resume` in setup."""


def setup(
    fabric,
    model: nn.Module,
    method: Method,
    data,
    tokenizer,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer: Any,
    out_dir: Path,
    run: Optional[RunArgs] = None,
    *,
    initial_weights: Optional[Path] = None,
    model_files_from: Optional[Path] = None,
    job: Any = None,
    logger=None,
    resume_dir: Any = RESOLVE_HERE,
) -> Trainer:
    """Prepare data, model, optimizer and checkpoint writer for `fit` (resuming if asked).

    Call it on every rank after `fabric.launch()` (see `litllm.train.fabric.make_fabric`).

    Args:
        fabric: a launched `lightning_fabric.Fabric`.
        model: a `GPT`, not set up yet: built on `fabric.device`, or on the meta device under FSDP
            (then materialised at setup with `reset_parameters()`).
        method: the method-specific inputs (see `Method`).
        data: a DataModule (`litllm.data.base`); batches are dicts with `input_ids` and `labels` (B, T),
            labels already shifted (`data.ignore_index` = no loss), and optionally more keys, which
            reach `method.loss` (and, by default, the model). Connected here (micro_batch_size,
            max_seq_length), prepared on global rank 0 and set up on every rank.
        tokenizer: a `litllm.tokenizer.Tokenizer`; its files are saved with every checkpoint.
        train: batch sizes, budget, schedule, clipping, saving.
        eval: validation interval and size.
        optimizer: a torch.optim class name ("AdamW"), {"class_path": ..., "init_args": {...}}, or the
            value jsonargparse gives for the CLI type `litllm.train.optimizer.OptimizerSpec`.
        out_dir: where `step-XXXXXXXX/` checkpoints, `final/`, logs and the loss curve go.
        run: the shared command flags; setup uses `seed` (model init, data order, dropout; restored
            exactly on resume), `resume` (False, "auto" or a checkpoint path), `compile` (each block),
            `activation_checkpointing` and `fast_dev_run` (only the budget changes: a few steps, a checkpoint
            halfway that is resumed from at once, one validation batch; see `litllm.train.fast_dev_run`).
            The process flags (devices, ...) went into `fabric`.
        initial_weights: a `lit_model.safetensors` to start from (finetuning, continued pretraining).
            Loaded before `method.transform` when the model is materialised, after setup when it is on meta.
        model_files_from: a folder whose tokenizer/prompt files are copied into every checkpoint
            (default: `tokenizer.checkpoint_dir`).
        job: the command's job (its flags as a dataclass, `litllm.flags`; or a plain dict of them), recorded flat
            as `hyperparameters.yaml` in every checkpoint and logged as the run's hyperparameters.
        logger: a `litllm.train.loggers` logger (rank 0 logs); None: no metric logging.
        resume_dir: the checkpoint `run.resume` names, as the command resolved it before launch
            (`litllm.train.checkpoints.resolve_resume`, None: start fresh); by default resolved here.
    """
    run, out_dir = run or RunArgs(), Path(out_dir)
    train, eval, dev_run = _dev_run_budget(run, train, eval, out_dir, job)
    config = model.config
    accumulation = train.gradient_accumulation_iters(fabric.world_size)
    seq_length = train.max_seq_length or config.block_size
    resume_dir = _check_run(config, tokenizer, seq_length, out_dir, run, resume_dir)  # before anything is written
    out_dir_held = frozenset(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else None
    seq_length = _connect_data(fabric, data, tokenizer, train, seq_length)
    stream = BatchStream(fabric, data.train_dataloader(), run.seed)
    val_loader = _distribute(fabric, data.val_dataloader())
    accumulation, total_steps, warmup_steps = _plan_steps(fabric, train, stream, seq_length, accumulation,
                                                          note=dev_run is None)
    _shorten_rope_cache(model, min(config.block_size, seq_length + (eval.max_new_tokens or 0)))
    fabric.seed_everything(run.seed, verbose=False)
    model, opt = _setup_model_and_optimizer(fabric, model, method, optimizer, initial_weights, run, train, seq_length)
    base_lrs = [group["lr"] for group in opt.param_groups]  # before a resume overwrites them with scheduled ones
    state, restored = _restore(fabric, resume_dir, model, opt, method, stream)
    writer = _checkpoint_writer(
        fabric, model, config, method, tokenizer, train, run, out_dir, model_files_from, job, logger,
        resume_dir=resume_dir, restored=restored, loaders={"train": stream.loader, "val": val_loader},
        fast_dev_run=dev_run is not None,
    )
    return Trainer(
        fabric=fabric, model=model, method=method, optimizer=opt, stream=stream, val_loader=val_loader,
        writer=writer, train=train, eval=eval, out_dir=out_dir, seq_length=seq_length, accumulation=accumulation,
        total_steps=total_steps, warmup_steps=warmup_steps, ignore_index=data.ignore_index,
        batch_unit="packed rows" if getattr(data, "packing", False) else "samples", state=state,
        base_lrs=base_lrs, logger=logger, dev_run=dev_run, out_dir_held=out_dir_held,
    )


def _dev_run_budget(run: RunArgs, train: TrainArgs, eval: EvalArgs, out_dir: Path, job: Any):
    """`(train, eval, dev_run)`: with `--fast_dev_run`, the recipe as given for a few steps (out_dir is already a
    temporary folder) and its `litllm.train.fast_dev_run.DevRun`; else the arguments unchanged and None."""
    from litllm.train.fast_dev_run import DevRun, dev_run_steps, shorten

    dev_steps = dev_run_steps(run.fast_dev_run)
    if dev_steps is None:
        return train, eval, None
    train, eval = shorten(train, eval, dev_steps)
    from litllm.hparams import hyperparameters

    return train, eval, DevRun(dev_steps, user_out_dir=Path(hyperparameters(job).get("out_dir") or out_dir))


def _check_run(config, tokenizer, seq_length: int, out_dir: Path, run: RunArgs, resume_dir: Any):
    """Refuse a run that cannot work before it writes anything; returns the checkpoint to resume from (None: fresh)."""
    from litllm.train.checkpoints import resolve_resume

    _check_sizes(config, tokenizer, seq_length)
    check_out_dir_reuse(out_dir, run.resume)
    if resume_dir is RESOLVE_HERE:  # a caller (a script, a test) that did not resolve it before launch
        resume_dir = resolve_resume(run.resume, out_dir, config)
    return resume_dir


def _restore(fabric, resume_dir: Optional[Path], model, optimizer, method: Method, stream: "BatchStream"):
    """`(state, restored)`: the run's counters, restored from `resume_dir` (with the model, optimizer and data
    position) when there is one."""
    from litllm.train.checkpoints import restore_checkpoint

    state = {"step": 0, "tokens": 0, "epoch": 0, "batches_in_epoch": 0}
    restored = None
    if resume_dir is not None:
        restored = restore_checkpoint(fabric, resume_dir, model, optimizer, method, stream, state)
    return state, restored


def _check_sizes(config, tokenizer, seq_length: int) -> None:
    """The training length fits the model's window, and the tokenizer's ids its embedding table."""
    if seq_length > config.block_size:
        raise LitLLMError(f"--train.max_seq_length ({seq_length}) exceeds the model's block_size ({config.block_size})")
    if tokenizer is not None and tokenizer.vocab_size > config.padded_vocab_size:
        raise LitLLMError(
            f"the tokenizer's vocabulary ({tokenizer.vocab_size} tokens, {tokenizer.checkpoint_dir}) exceeds the "
            f"model's embedding table ({config.padded_vocab_size} rows): use a model with vocab_size >= "
            f"{tokenizer.vocab_size} or a smaller tokenizer"
        )


def _connect_data(fabric, data, tokenizer, train: TrainArgs, seq_length: int) -> int:
    """Connect the data module, prepare it once on global rank 0 and set it up everywhere; returns the training
    length (the longest sample when `--train.max_seq_length` is unset and the data is shorter than the window)."""
    data.connect(tokenizer, batch_size=train.micro_batch_size, max_seq_length=seq_length)
    if fabric.global_rank == 0:
        data.prepare_data()
    fabric.barrier()
    data.setup()
    if train.max_seq_length is None:
        # unset: size the run for the data, not for the model's window (131072 for Llama 3.1)
        longest = data.longest_sample()
        if longest is not None and longest < seq_length:
            seq_length = longest
            fabric.print(f"--train.max_seq_length unset: using {seq_length}, the longest sample in the data")
            # the loaders follow (packed rows are this long)
            data.connect(tokenizer, batch_size=train.micro_batch_size, max_seq_length=seq_length)
    return seq_length


def _plan_steps(fabric, train: TrainArgs, stream: "BatchStream", seq_length: int, accumulation: int,
                note: bool) -> tuple[int, int, int]:
    """`(accumulation, total_steps, warmup_steps)` for this data and device count, the accumulation the
    batch sizes ask for fitted to the data (`note`: say when the steps are very few)."""
    world_size = fabric.world_size
    accumulation = _fit_accumulation(fabric, train, stream.batches_per_epoch, accumulation)
    total_steps = train.total_steps(seq_length, stream.batches_per_epoch, accumulation,
                                    accumulation * train.micro_batch_size * world_size)
    if note:
        _note_few_steps(fabric, train, total_steps)
        _note_ends_before_max_steps(fabric, train, total_steps, accumulation * train.micro_batch_size * world_size,
                                    seq_length)
    return accumulation, total_steps, train.warmup_steps(total_steps)


def _shorten_rope_cache(model: nn.Module, rope_length: int) -> None:
    """The RoPE cache covers the training length plus a validation sample's reply, not the whole window."""
    if hasattr(model, "max_seq_length") and rope_length < model.max_seq_length:
        model.max_seq_length = rope_length


def _setup_model_and_optimizer(fabric, model, method: Method, optimizer: Any, initial_weights: Optional[Path],
                               run: RunArgs, train: TrainArgs, seq_length: int):
    """`(model, optimizer)`, both set up with Fabric: `prepare_model`, then the optimizer over the parameters the
    method trains."""
    from litllm.train.optimizer import build_optimizer

    with run_out_of_memory(fabric, train, seq_length, "setting up the model"):
        model = prepare_model(
            fabric, model, method, initial_weights, compile=run.compile,
            activation_checkpointing=run.activation_checkpointing,
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LitLLMError(f"method {method.name!r} leaves no parameter to train")
    return model, fabric.setup_optimizers(build_optimizer(optimizer, trainable))


def _checkpoint_writer(
    fabric, model, config, method: Method, tokenizer, train: TrainArgs, run: RunArgs, out_dir: Path,
    model_files_from: Optional[Path], job: Any, logger, *, resume_dir, restored, loaders: dict,
    fast_dev_run: bool,
):
    """The run's `CheckpointWriter`, with the provenance record and the logger's run (global rank 0 logs and
    writes them: see `litllm.train.provenance`)."""
    from litllm.train import checkpoints as ckpt

    writer = ckpt.CheckpointWriter(
        fabric, out_dir, model, config, method, tokenizer_dir=model_files_from or _tokenizer_dir(tokenizer),
        job=job, extra_files=dict(method.extra_files), state_dict_type=train.state_dict_type,
    )
    logger_run = None
    if fabric.global_rank == 0:
        from litllm.train.provenance import PROVENANCE_FILE, start_run_record

        text, logger_run = start_run_record(fabric, logger, run.logger, method.name, config.name, out_dir,
                                            resume_dir, restored, loaders, writer.hparams, fast_dev_run=fast_dev_run)
        writer.extra_files[PROVENANCE_FILE] = text
    writer.logger_run = logger_run  # kept in each checkpoint's training state: a resumed job continues the run
    return writer

def run_out_of_memory(fabric, train: TrainArgs, seq_length: int, doing: str):
    """`litllm.train.fabric.clear_out_of_memory` for a step of this run: the line names the run's sizes."""
    from litllm.train.fabric import clear_out_of_memory as clear

    precision = getattr(fabric.strategy.precision, "precision", "?")
    return clear(
        f"on {fabric.device} while {doing} ({fabric.world_size} device(s), precision {precision}, "
        f"micro-batch {train.micro_batch_size} x {seq_length} tokens)"
    )


def fit(t: Trainer) -> TrainResult:
    """Train until the step budget is spent; checkpoint, validate and log on the way; write `final/`.

    Returns a `TrainResult`. `final/` in out_dir is a model folder (`lit_model.safetensors`,
    `model_config.yaml`, tokenizer files) that generate, finetune and convert_from_litllm take.
    """
    try:
        return _fit(t)
    except Exception:
        # a crash (a diverged run, out of memory, bad data) closes the tracker's run as failed; a preemption
        # (SystemExit) or a kill leaves it running, for the resumed job to continue
        if t.logger is not None and t.fabric.global_rank == 0:
            t.logger.finalize("failed")
        if t.state["step"] == 0 and t.fabric.global_rank == 0:
            _remove_unfinished_output(t)
        raise


def _remove_unfinished_output(t: Trainer) -> None:
    """A fresh run that fails before its first step ends (a GRPO reward function that raises, out of memory at once)
    leaves no partial output: the logs setup started are removed where out_dir did not hold them before, and out_dir
    too where the run made it and nothing else is in it. Only the run's own `logs` is touched: out_dir may be a folder
    other programs write to (`--out_dir .`). (Best effort: the run's own error is the one raised.)"""
    import contextlib
    import shutil

    logs = t.out_dir / "logs"
    with contextlib.suppress(OSError):
        if "logs" not in (t.out_dir_held or frozenset()) and logs.is_dir() and not logs.is_symlink():
            shutil.rmtree(logs)
        if t.out_dir_held is None:
            t.out_dir.rmdir()  # only where empty


@dataclass
class _FitRun:
    """What the pieces of one `fit` hand each other (the `Trainer` holds what setup built)."""

    result: TrainResult
    guard: NonFiniteGuard
    """Non-finite steps: skipped and counted on the device, read where the loop syncs."""
    throughput: Any
    """The run's `litllm.train.flops.Throughput`."""
    saved_at: int
    """The step of the last checkpoint (or of the start)."""
    running: dict[str, torch.Tensor] = field(default_factory=dict)
    """Summed on the device since the last flush (no host sync per step): loss sum, count, input tokens, metrics."""


def _fit(t: Trainer) -> TrainResult:
    fabric, state = t.fabric, t.state
    r = _start_fit(t)
    if t.eval.initial_validation and state["step"] == 0 and t.val_loader is not None:
        _validate_and_log(t, r, after=False)
    progress = _progress_bar(fabric, t.total_steps, state["step"])
    r.throughput.start(state)
    stop = StopOnSignal()  # preemption hook: SIGUSR1/SIGTERM -> checkpoint at the next step boundary
    while state["step"] < t.total_steps:
        micro_batches = t.stream.next_window(t.accumulation)
        if not micro_batches:
            break  # the data ran out (only with a finite loader and an unset budget)
        grad_norm = _optimizer_step(t, r, micro_batches)  # ---- the step's state is complete after it
        if state["step"] % t.train.log_interval == 0 or state["step"] == t.total_steps:
            _log_step(t, r, grad_norm, progress)
        progress.update(1)
        if t.val_loader is not None and state["step"] % t.eval.interval == 0 and state["step"] < t.total_steps:
            _validate_and_log(t, r, after=True)
            r.throughput.start(state)  # validation time isn't training throughput
        if t.train.save_interval is not None and state["step"] % t.train.save_interval == 0:
            _save_interval_checkpoint(t, r)
        _stop_if_preempted(t, r, stop)
    progress.close()
    _flush(t, r)
    r.guard.check(fabric)
    r.result.step, r.result.tokens_seen = state["step"], state["tokens"]
    if t.eval.final_validation and t.val_loader is not None:
        _validate_and_log(t, r, after=True)
    if t.train.save_interval is not None and r.saved_at != state["step"]:
        _save_step(t, r)
    _write_final(t, r.result, stop)
    _finish(t, r.result)
    return r.result


def _start_fit(t: Trainer) -> _FitRun:
    """Announce the run (one line) and start its counters."""
    from litllm.train.flops import Throughput

    fabric, model, train = t.fabric, t.model, t.train
    config = model.config
    if train.router_aux_loss_coef is not None:  # MoE: the load-balancing loss's weight (the model adds it)
        config.router_aux_loss_coef = train.router_aux_loss_coef
    trainable = [p for p in model.parameters() if p.requires_grad]
    throughput = Throughput(fabric, config, t.seq_length, train.peak_flops, trainable_fraction=_trainable_fraction(model))
    global_batch = t.accumulation * train.micro_batch_size * fabric.world_size
    fabric.print(
        f"Training {t.total_steps} steps ({t.accumulation} accumulation x {train.micro_batch_size} micro-batch x "
        f"{fabric.world_size} devices = {global_batch} {t.batch_unit} of up to {t.seq_length} tokens per step), "
        f"warmup {t.warmup_steps}, {sum(p.numel() for p in trainable):,} trainable parameters"
    )
    result = TrainResult(step=t.state["step"])
    return _FitRun(result=result, guard=_nonfinite_guard(t), throughput=throughput, saved_at=t.state["step"])


def _optimizer_step(t: Trainer, r: _FitRun, micro_batches: list[Batch]) -> Optional[torch.Tensor]:
    """Schedule the learning rate, train one step on `micro_batches`, count it; returns the gradient norm."""
    from litllm.train.schedule import lr_at

    fabric, opt, state = t.fabric, t.optimizer, t.state
    # every param group follows the first group's schedule, keeping its own lr ratio
    base_lrs = t.base_lrs
    lr = lr_at(state["step"], base_lrs[0], min(t.train.min_lr, base_lrs[0]), t.warmup_steps, t.total_steps)
    for group, base in zip(opt.param_groups, base_lrs):
        group["lr"] = lr * base / base_lrs[0] if base_lrs[0] else base
    if t.dev_run is not None:
        t.dev_run.start_step(fabric)
    with run_out_of_memory(fabric, t.train, t.seq_length, f"training step {state['step'] + 1}"):
        sums, grad_norm = train_step(
            fabric, t.model, opt, micro_batches, t.train.max_norm, t.ignore_index, t.method.loss, guard=r.guard
        )
    for name, value in sums.items():
        r.running[name] = r.running[name] + value if name in r.running else value
    state["step"] += 1  # ---- optimizer step boundary
    t.stream.update_counters(state)
    if t.dev_run is not None:
        t.dev_run.end_step(fabric, state["step"], micro_batches)
    return grad_norm


def _flush(t: Trainer, r: _FitRun) -> Optional[dict[str, float]]:
    """Sum the counters since the last flush over every rank; returns the global means (None: no step)."""
    if not r.running:
        return None
    names = list(r.running)
    totals = t.fabric.all_reduce(torch.stack([r.running[n] for n in names]), reduce_op="sum").tolist()  # one sync
    r.running.clear()
    sums = dict(zip(names, totals))
    t.state["tokens"] += int(sums.pop("input_tokens"))
    count = sums.pop("count")
    return {name: value / count for name, value in sums.items()} if count > 0 else None


def _log_step(t: Trainer, r: _FitRun, grad_norm: Optional[torch.Tensor], progress) -> None:
    """Log the global means since the last log (the step's loss, lr, throughput, non-finite steps); stop a run
    that diverged."""
    state = t.state
    means = _flush(t, r) or {}
    loss = means.pop("loss", None)
    r.result.losses[state["step"]] = loss
    metrics = {"loss": loss, "lr": t.optimizer.param_groups[0]["lr"], "tokens": state["tokens"], "epoch": state["epoch"]}
    metrics.update(means)
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)  # before clipping, of this step
    metrics.update(r.throughput.update(state))
    metrics.update(r.guard.read(t.fabric))
    _log(t.fabric, t.logger, metrics, state["step"])
    r.guard.stop_if_diverged()
    progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics.get('tokens_per_sec', 0):.0f}")


def _validate_and_log(t: Trainer, r: _FitRun, after: bool) -> None:
    """Validate, log and print the loss; `after`: then `method.after_validation` (e.g. a sample reply)."""
    fabric, step = t.fabric, t.state["step"]
    with run_out_of_memory(fabric, t.train, t.seq_length, "validating"):
        metrics = validate(fabric, t.model, t.val_loader, t.eval.max_iters, t.ignore_index, t.method.loss)
        r.result.val_loss = r.result.val_losses[step] = metrics["loss"]
        _log(fabric, t.logger, {f"val_{k}": v for k, v in metrics.items()}, step)
        _console(fabric, f"Step {step}: validation loss {metrics['loss']:.4f}")
        if after and t.method.after_validation is not None:
            t.method.after_validation(fabric, t.model, step)


def _save_step(t: Trainer, r: _FitRun):
    """Write the `step-XXXXXXXX/` checkpoint of this step; returns its folder."""
    r.guard.check(t.fabric)  # never a checkpoint after max_nonfinite_steps (the writer also checks the weights)
    with run_out_of_memory(t.fabric, t.train, t.seq_length, f"saving the checkpoint of step {t.state['step']}"):
        saved = t.writer.save_step(t.optimizer, t.state, t.stream.state_dict())
    r.saved_at = t.state["step"]
    return saved


def _save_interval_checkpoint(t: Trainer, r: _FitRun) -> None:
    """The checkpoint every `--train.save_interval` steps (a fast dev run resumes from its first at once)."""
    step = t.state["step"]
    means = _flush(t, r)  # the checkpoint's token count must be exact
    if means is not None:
        r.result.losses.setdefault(step, means["loss"])
    saved = _save_step(t, r)
    if t.dev_run is not None and step == t.dev_run.resume_step:
        t.dev_run.round_trip(t, saved)
    r.throughput.start(t.state)


def _stop_if_preempted(t: Trainer, r: _FitRun, stop: StopOnSignal) -> None:
    """Preemption hook (collective): after a SIGUSR1/SIGTERM every rank checkpoints this same step and exits
    with `REQUEUE_EXIT_CODE` (SystemExit)."""
    if not stop.agreed(t.fabric):
        return
    if r.saved_at != t.state["step"]:
        _flush(t, r)  # the checkpoint's token count must be exact
        _save_step(t, r)
    stop.exit(t.fabric, t.state["step"])


def _write_final(t: Trainer, result: TrainResult, stop: StopOnSignal) -> None:
    """Write `final/` (moving an existing one aside, never deleting what another command wrote there), the method's
    outputs, the loss curve; close the logger's run."""
    fabric = t.fabric
    previous = _move_aside(fabric, t.out_dir / "final")
    with run_out_of_memory(fabric, t.train, t.seq_length, "writing the final model"):
        result.final_dir = t.writer.save_final()
    stop.restore()  # preemption hook: a signal after the last step needs no requeue
    if previous is not None:
        _settle_previous(fabric, previous, result.final_dir)
    if t.dev_run is None:  # a dev run's folder is deleted: it reports its own checks instead
        fabric.print(f"Saved the final model to {result.final_dir}")

def _finish(t: Trainer, result: TrainResult) -> None:
    """The loss curve; close the logger's run; a fast dev run's report."""
    fabric = t.fabric
    if fabric.global_rank == 0:
        from litllm.train.loggers import loss_history, plot_loss_curve

        png = plot_loss_curve(loss_history(t.logger, result.losses, result.val_losses), t.out_dir / "loss_curve.png")
        if png is not None and t.dev_run is None:
            fabric.print(f"Loss curve: {png}")
        if t.logger is not None:
            t.logger.finalize("success")
    if t.dev_run is not None:
        t.dev_run.report(t, result)


def check_out_dir_reuse(out_dir: Path, resume: Resume) -> None:
    """A fresh run (no `--resume`) refuses an out_dir holding another run's `step-*` checkpoints or `final/`:
    a later `--resume auto` would continue the old run, and its final/ may hold other commands' outputs."""
    from litllm.train.checkpoints import STEP_DIR

    if not (resume is False or resume is None or resume == "false") or not Path(out_dir).is_dir():
        return
    steps = sorted(p.name for p in Path(out_dir).iterdir() if p.is_dir() and STEP_DIR.match(p.name))
    used = [f"{name}/" for name in steps[-1:] + (["final"] if (Path(out_dir) / "final").exists() else [])]
    if used:
        raise LitLLMError(
            f"--out_dir {out_dir} already holds a run ({', '.join(used)}): continue it with --resume auto, or pick "
            "another --out_dir"
        )


def _move_aside(fabric, final: Path) -> Optional[Path]:
    """Rename an existing `final/` (rank 0) so the new one can replace it without deleting anything; returns its new path."""
    if fabric.global_rank != 0 or not final.exists():
        return None
    n = 1
    while (aside := final.with_name(f"{final.name}.previous-{n}")).exists():
        n += 1
    final.rename(aside)
    return aside


def _settle_previous(fabric, previous: Path, final: Path) -> None:
    """The old final/ held only files the new one rewrote: remove it; else keep it and say where (one line)."""
    import shutil

    extra = sorted(p.name for p in previous.iterdir() if not (final / p.name).exists())
    if not extra:
        shutil.rmtree(previous)
        return
    shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
    fabric.print(f"The previous {final.name}/ held outputs this run doesn't write ({shown}): kept it as {previous}")


def _nonfinite_guard(t: Trainer) -> NonFiniteGuard:
    """The run's `litllm.train.nonfinite.NonFiniteGuard` (16-mixed's GradScaler skips inf gradients itself)."""
    scaler = getattr(t.fabric.strategy.precision, "scaler", None)
    return NonFiniteGuard(t.fabric.device, t.train.max_nonfinite_steps, t.state["step"], t.out_dir,
                          grads_checked_by_scaler=scaler is not None)


FEW_STEPS = 10
"""A run of fewer optimizer steps gets a note: it will hardly move the weights."""


def _note_few_steps(fabric, train: TrainArgs, total_steps: int) -> None:
    """One line when the data set's size (not a --train.max_steps the user chose) leaves very few steps."""
    if total_steps < FEW_STEPS and train.max_steps is None:
        fabric.print(
            f"Note: this run makes only {total_steps} optimizer step(s), too few to learn much: raise --train.epochs "
            "or lower --train.global_batch_size"
        )


def _note_ends_before_max_steps(fabric, train: TrainArgs, total_steps: int, global_batch: int, seq_length: int) -> None:
    """One line when another budget (the command's default epochs, or --train.max_tokens) ends the run before the
    --train.max_steps the user chose: the smallest budget wins, and the run would otherwise be silently shorter."""
    if train.max_steps is None or total_steps >= train.max_steps:
        return
    by_tokens = train.max_tokens is not None and train.max_tokens // (global_batch * seq_length) == total_steps
    budget = f"--train.max_tokens {train.max_tokens}" if by_tokens else f"--train.epochs {train.epochs}"
    fabric.print(f"Note: {budget} ends the run after {total_steps} step(s), before --train.max_steps "
                 f"{train.max_steps}: raise {budget.split()[0]} to train longer")


def _fit_accumulation(fabric, train: TrainArgs, batches_per_epoch: Optional[int], accumulation: int) -> int:
    """A global batch larger than the training set would repeat samples within one step: shrink it to one epoch.

    An unset global batch is sized for the data: at most `AUTO_GLOBAL_BATCH` samples, fewer so that one epoch
    makes at least `AUTO_MIN_EPOCH_STEPS` optimizer steps.
    """
    from litllm.train.args import AUTO_MIN_EPOCH_STEPS

    if train.global_batch_size is None:
        if batches_per_epoch is None:
            return accumulation
        fitted = max(1, min(accumulation, batches_per_epoch // AUTO_MIN_EPOCH_STEPS))
        if fitted < accumulation:
            fabric.print(
                f"--train.global_batch_size unset: using {fitted * train.micro_batch_size * fabric.world_size} "
                f"for a small training set ({batches_per_epoch} micro-batches per device per epoch)"
            )
        return fitted
    if batches_per_epoch is None or batches_per_epoch >= accumulation:
        return accumulation
    fabric.print(
        f"Note: --train.global_batch_size {train.global_batch_size} exceeds the training set ({batches_per_epoch} "
        f"micro-batches of {train.micro_batch_size} per device): each step takes the whole set once instead "
        f"({batches_per_epoch} accumulation steps)"
    )
    return batches_per_epoch


# ---------------------------------------------------------------------- one optimizer step
def train_step(
    fabric,
    model,
    optimizer,
    micro_batches: list[Batch],
    max_norm: Optional[float],
    ignore_index: int,
    loss_fn: Callable[[nn.Module, Batch, int], LossOutput] = token_cross_entropy,
    guard: Optional[NonFiniteGuard] = None,
) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Forward/backward every micro-batch, then normalise, clip and step. No host sync.

    With a `guard` (`litllm.train.nonfinite`), a step whose global loss or gradient norm is NaN/inf
    is skipped (its gradients are zeroed on the device) and counted.

    Returns this rank's sums as 0-dim float64 device tensors ({"loss", "count", "input_tokens",
    *metrics}) and the global gradient norm before clipping (None without clipping).

    Each micro-batch's loss *sum* is backpropagated (pre-scaled by 1 / this rank's input positions,
    a shape, to keep gradients at mean-loss magnitude in low precision); once every micro-batch is in,
    the gradients are multiplied by world_size x positions / global count, which makes them the
    gradient of the global mean (the all-reduce of DDP and FSDP averages over ranks, hence the world_size).
    """
    positions = sum(b["input_ids"].numel() for b in micro_batches)  # a shape: no sync
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        batch = {k: v.to(fabric.device, non_blocking=True) for k, v in batch.items()}
        with fabric.no_backward_sync(model, enabled=not is_last):
            loss_sum, count, metrics = loss_fn(model, batch, ignore_index)
            fabric.backward(loss_sum / positions)
        for name, value in (("loss", loss_sum), ("count", count), *metrics.items()):
            value = value.detach().double()
            sums[name] = sums[name] + value if name in sums else value
    sums["input_tokens"] = torch.tensor(float(positions), dtype=torch.float64, device=sums["loss"].device)
    if guard is None:
        global_count = fabric.all_reduce(sums["count"].clone(), reduce_op="sum").clamp(min=1)
    else:  # the loss sum (unclipped: a gradient check too) rides along in the count's all-reduce
        unclipped = [guard.gradient_check(model)] if max_norm is None else []
        global_count, global_loss, *grad_check = fabric.all_reduce(
            torch.stack([sums["count"], sums["loss"], *unclipped]), reduce_op="sum"
        )
        global_count = global_count.clamp(min=1)
    scale = fabric.world_size * positions / global_count
    scales = {}  # one cast per gradient dtype
    for param in model.parameters():
        if param.grad is not None:
            dtype = param.grad.dtype
            param.grad.mul_(scales[dtype] if dtype in scales else scales.setdefault(dtype, scale.to(dtype)))
    grad_norm = None
    if max_norm is not None:
        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
    if guard is not None:
        ok = guard.step_ok(global_loss, grad_norm if max_norm is not None else grad_check[0])
        zero_nonfinite_step(model.parameters(), ok)
        guard.record(ok, global_loss / global_count)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


@torch.no_grad()
def validate(
    fabric,
    model,
    val_loader,
    max_iters: int,
    ignore_index: int,
    loss_fn: Callable[[nn.Module, Batch, int], LossOutput] = token_cross_entropy,
) -> dict[str, float]:
    """Global means over up to `max_iters` batches per rank: {"loss": ..., **metrics} (loss nan: nothing counted)."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(val_loader):
        if i >= max_iters:
            break
        batch = {k: v.to(fabric.device) for k, v in batch.items()}
        loss_sum, count, metrics = loss_fn(model, batch, ignore_index)
        for name, value in (("loss", loss_sum), ("count", count), *metrics.items()):
            sums[name] = sums.get(name, 0) + value.double()
    model.train(was_training)
    if not sums:  # no batch on this rank
        sums = {name: torch.zeros((), dtype=torch.float64, device=fabric.device) for name in ("loss", "count")}
    names = list(sums)
    totals = dict(zip(names, fabric.all_reduce(torch.stack([sums[n] for n in names]), reduce_op="sum").tolist()))
    count = totals.pop("count")
    if count == 0:
        return {name: float("nan") for name in totals}
    return {name: value / count for name, value in totals.items()}


# ---------------------------------------------------------------------- data order
class BatchStream:
    """Endless stream of training micro-batches across epochs, with an exactly resumable position.

    litdata `StreamingDataLoader`s save and restore their own state. Map-style DataLoaders are
    resumed by re-seeding the epoch's shuffle (seed + epoch) and skipping the batches already used.
    """

    def __init__(self, fabric, loader, seed: int) -> None:
        self.fabric = fabric
        self.seed = seed
        self.streaming = _is_streaming(loader)
        self.loader = loader = _distribute(fabric, loader)
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
        self._iter = None  # the next window starts iterating from the restored position
        self.epoch = data_state.get("epoch", counters.get("epoch", 0))
        if self.streaming:
            self.loader.load_state_dict(data_state["loader"])
        else:
            self.batches_in_epoch = data_state.get("batches_in_epoch", 0)
            self._skip = self.batches_in_epoch


def _is_streaming(loader) -> bool:
    """A loader that keeps its own position (litdata's): it resumes from its state and distributes itself."""
    return hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")


def _distribute(fabric, loader):
    """A map-style loader with a DistributedSampler for DDP/FSDP (batches move to the device in train_step);
    a streaming one as it is; None stays None (no validation set)."""
    if loader is None or _is_streaming(loader):
        return loader
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=True, move_to_device=False)
    return getattr(loader, "_dataloader", loader)


# ---------------------------------------------------------------------- small helpers
def _tokenizer_dir(tokenizer) -> Optional[Path]:
    return getattr(tokenizer, "checkpoint_dir", None)


def _trainable_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)


def _console(fabric, line: str) -> None:
    """A line on rank 0's console that leaves an open progress bar intact."""
    from tqdm import tqdm

    if fabric.global_rank == 0:
        tqdm.write(line)


def summary(result: TrainResult) -> str:
    """The run's last console line but the pointer to its output: `Done: N steps, T tokens, final loss L[, validation loss V]`."""
    if not result.losses or result.losses[max(result.losses)] is None:
        return f"Done: {result.step} steps"
    line = f"Done: {result.step} steps, {result.tokens_seen:,} tokens, final loss {result.losses[max(result.losses)]:.4f}"
    return line if result.val_loss is None else f"{line}, validation loss {result.val_loss:.4f}"


def _log(fabric, logger, metrics: dict, step: int) -> None:
    if logger is not None and fabric.global_rank == 0:
        logger.log_metrics(metrics, step)


def _progress_bar(fabric, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc="train", unit="step", disable=fabric.global_rank != 0, dynamic_ncols=True,
        mininterval=1.0,
    )
