"""`litllm finetune_lora` (also `finetune`), `finetune_full`, `finetune_adapter`, `finetune_adapter_v2`, `finetune_dpo`,
`finetune_grpo`.

    litllm finetune_lora checkpoints/meta-llama/Llama-3.2-1B --data JSON --data.json_path my_data.json
    litllm finetune_lora checkpoints/meta-llama/Llama-3.1-8B --quantize bnb.nf4 --config config_hub/finetune/llama-3.1-8b/qlora.yaml

Every method runs the one shared training loop (`litllm.train.loop.setup` + `fit`); a method is only a
`Method`: how the loaded model is transformed (LoRA / adapters / quantized base), which
parameters train, and what the final model folder holds. Outputs in `out_dir`:

- `step-XXXXXXXX/`: resumable training checkpoints (only the trained parameters for LoRA/adapters);
- `final/`: a model folder (`lit_model.safetensors`, `model_config.yaml`, tokenizer files,
  `prompt_style.yaml`) for `generate`, `chat`, `evaluate` and `convert_from_litllm`. LoRA merges its
  update into the base weights there and also leaves `lit_lora.safetensors` + `hyperparameters.yaml`
  (re-merge or export to PEFT with `litllm merge_lora`). Adapter models keep their extra structure
  and carry `adapter.yaml` (load them with `litllm.adapter.load_adapter_model`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.nn as nn

from litllm.data.base import DataModule
from litllm.errors import LitLLMError
from litllm.lora import LoRASettings
from litllm.model_folder import ADAPTER_SPEC, adapter_settings_yaml, read_safetensors
from litllm.precision import precision_dtypes
from litllm.flags import publish, with_flags
from litllm.train.args import EvalArgs, RunArgs, TrainArgs, with_run_args
from litllm.train.loop import TrainResult
from litllm.train.optimizer import OptimizerSpec

import litllm.data  # noqa: F401  (imports every DataModule class, so `--data <ClassName>` resolves)

QuantizeMode = Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.int8-training"]
# the frozen base only needs gradients with respect to its inputs, which bnb's int8 layer computes
_BNB_MODE = {"bnb.nf4": "bnb.nf4", "bnb.nf4-dq": "bnb.nf4-dq", "bnb.fp4": "bnb.fp4", "bnb.int8-training": "bnb.int8"}

# global batch and warmup unset: sized for the run (up to 16 samples, 10% warmup up to 100 steps), so a
# 30-record data set makes ~140 steps that learn (5 epochs of 1 sample per step) instead of 8 spent warming up
FINETUNE_TRAIN = TrainArgs(
    save_interval=1000, log_interval=1, global_batch_size=None, micro_batch_size=1, lr_warmup_steps=None, epochs=5,
    max_seq_length=None,
)
FINETUNE_EVAL = EvalArgs(interval=100, max_new_tokens=100, max_iters=100)
PEFT_OPTIMIZER: dict[str, Any] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-4, "weight_decay": 0.0}}
FULL_OPTIMIZER: dict[str, Any] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-5, "weight_decay": 0.02}}
DPO_TRAIN = TrainArgs(
    save_interval=1000, log_interval=1, global_batch_size=16, micro_batch_size=1, lr_warmup_steps=10, epochs=1,
    max_seq_length=None,
)
DPO_EVAL = EvalArgs(interval=100, max_iters=100)
DPO_OPTIMIZER: dict[str, Any] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-5, "weight_decay": 0.0}}
# GRPO: batch sizes count prompts (each gets --num_generations completions); max_seq_length unset: the longest
# prompt + --max_new_tokens
GRPO_TRAIN = TrainArgs(
    save_interval=100, log_interval=1, global_batch_size=4, micro_batch_size=1, lr_warmup_steps=0, epochs=1,
    max_seq_length=None,
)
GRPO_EVAL = EvalArgs(interval=50, max_iters=4)
GRPO_OPTIMIZER: dict[str, Any] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5, "weight_decay": 0.0}}


@dataclass
class FinetuneJob:
    """One finetuning command's arguments, typed, as they travel from the CLI into every process."""

    method: Optional[str]
    """"full", "lora", "adapter" or "adapter_v2" (None until `finetune_dpo` reads its `--method`)."""
    checkpoint_dir: Path
    out_dir: Path
    data: Optional[DataModule]
    train: TrainArgs
    eval: EvalArgs
    optimizer: OptimizerSpec
    run: RunArgs
    hparams: dict[str, Any]
    """The command's flat arguments, saved as hyperparameters.yaml."""
    quantize: Optional[QuantizeMode] = None
    lora: Any = None
    """`litllm.lora.LoRASettings` (LoRA only)."""
    adapter: Any = None
    """`litllm.adapter.AdapterSettings` (adapters only)."""
    preference: Any = None
    """`litllm.preference.PreferenceSettings` (finetune_dpo only): the method's loss becomes a preference loss."""
    precompute_reference: bool = False
    grpo: Any = None
    """finetune_grpo only: {"settings": `litllm.grpo.loss.GRPOSettings`, "rewards": [`litllm.grpo.rewards.Reward`]}."""
    resume_dir: Optional[Path] = None
    """The checkpoint `--resume` names, resolved once before launch (None: start fresh)."""


# ---------------------------------------------------------------------- the commands
def finetune_command(
    method: Optional[str],
    out_dir: str,
    train: TrainArgs = FINETUNE_TRAIN,
    eval: EvalArgs = FINETUNE_EVAL,
    optimizer: OptimizerSpec = PEFT_OPTIMIZER,
    docs: Optional[dict[str, str]] = None,
) -> Callable[[Callable], Callable]:
    """Give a finetuning command the arguments every `finetune_*` shares, declared and documented here once:
    `checkpoint_dir` and `out_dir` before its own, `data`, `train`, `eval` and `optimizer` after them (with
    these defaults), then the `RunArgs` flags (`with_run_args`). The command declares keyword-only
    `job: FinetuneJob` instead and receives them in it, `method` preset (None: the command sets it, as
    `finetune_dpo --method` does). `docs` replaces a shared help text."""
    P = inspect.Parameter
    lr = f"{optimizer['init_args']['lr']:.0e}".replace("e-0", "e-")  # 2e-4
    head = [P("checkpoint_dir", P.POSITIONAL_OR_KEYWORD, annotation=Path),
            P("out_dir", P.POSITIONAL_OR_KEYWORD, default=Path(out_dir), annotation=Path)]
    tail = [P("data", P.POSITIONAL_OR_KEYWORD, default=None, annotation=Optional[DataModule]),
            P("train", P.POSITIONAL_OR_KEYWORD, default=train, annotation=TrainArgs),
            P("eval", P.POSITIONAL_OR_KEYWORD, default=eval, annotation=EvalArgs),
            P("optimizer", P.POSITIONAL_OR_KEYWORD, default=optimizer, annotation=OptimizerSpec)]
    run_params = [P("run", P.KEYWORD_ONLY, annotation=RunArgs), P("hparams", P.KEYWORD_ONLY, annotation=dict[str, Any])]
    docs = {
        "checkpoint_dir": "The converted base model folder (`litllm download` / `convert_to_litllm`).",
        "out_dir": "Where checkpoints (`step-XXXXXXXX/`, `final/`) and logs are written.",
        "data": "The data module (default `Alpaca`), e.g. `--data JSON --data.json_path my_data.json`.",
        "train": "Training settings (batch sizes, budget, schedule, saving).",
        "eval": "Validation settings (`--eval.max_new_tokens` prints a sample reply at each validation).",
        "optimizer": f"A torch.optim class name (`--optimizer AdamW --optimizer.lr {lr}`) or {{class_path, init_args}}.",
        **(docs or {}),
    }

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "job"]
        public = signature.replace(parameters=head + own + tail + run_params)
        shared = [p.name for p in head + tail + run_params]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = public.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            job = FinetuneJob(method, **{name: arguments.pop(name) for name in shared})
            return command(**arguments, job=job)

        return with_run_args(seed=1337)(publish(wrapper, command, public, docs))

    return decorate


@finetune_command("lora", "out/finetune/lora")
@with_flags("lora", LoRASettings, prefix="lora_")
def finetune_lora(quantize: Optional[QuantizeMode] = None, lora: Optional[dict[str, Any]] = None, *,
                  job: FinetuneJob) -> TrainResult:
    """Finetune a model with LoRA (QLoRA with `--quantize`): train low-rank updates of frozen weights.

    Args:
        quantize: QLoRA: store the frozen base weights with bitsandbytes (`bnb.nf4`, `bnb.nf4-dq`,
            `bnb.fp4`, `bnb.int8-training`); the LoRA weights train in `precision`.
    """
    return _launch(replace(job, quantize=quantize, lora=LoRASettings(**lora)))


@finetune_command("full", "out/finetune/full", optimizer=FULL_OPTIMIZER)
def finetune_full(*, job: FinetuneJob) -> TrainResult:
    """Finetune every weight of a model."""
    return _launch(job)


def _adapter_command(version: int, name: str, out_dir: str, summary: str) -> Callable:
    """`finetune_adapter` (version 1) and `finetune_adapter_v2` (version 2): one command, two defaults."""

    def command(quantize: Optional[QuantizeMode] = None, adapter_start_layer: int = 2, adapter_prefix_length: int = 10,
                *, job: FinetuneJob) -> TrainResult:
        from litllm.adapter import AdapterSettings

        return _launch(replace(job, quantize=quantize,
                               adapter=AdapterSettings(version, adapter_start_layer, adapter_prefix_length)))

    command.__name__ = command.__qualname__ = name
    command.__doc__ = f"""{summary}

    Args:
        quantize: Store the frozen base weights with bitsandbytes (`bnb.nf4`, `bnb.nf4-dq`, `bnb.fp4`,
            `bnb.int8-training`).
        adapter_start_layer: First block (0-based) that gets a learned prefix.
        adapter_prefix_length: Learned prefix tokens per adapted block.
    """
    return finetune_command(name.removeprefix("finetune_"), out_dir)(command)


finetune_adapter = _adapter_command(
    1, "finetune_adapter", "out/finetune/adapter",
    "Finetune a model with LLaMA-Adapter: learned, zero-gated prefixes in the later layers' attention.",
)
finetune_adapter_v2 = _adapter_command(
    2, "finetune_adapter_v2", "out/finetune/adapter-v2",
    "Finetune a model with LLaMA-Adapter v2: gated prefixes plus a scale and bias on every Linear, and the norms.",
)


@finetune_command(
    None, "out/finetune/dpo", train=DPO_TRAIN, eval=DPO_EVAL, optimizer=DPO_OPTIMIZER,
    docs={
        "checkpoint_dir": "The converted model folder to start from (usually an instruction-tuned one).",
        "data": "The preference pairs: `--data Preference --data.json_path pairs.json` (see `litllm.data.preference`).",
        "train": "Training settings (batch sizes count pairs; `max_seq_length` bounds prompt + the longer reply).",
        "eval": "Validation settings; validation reports `val_rewards/accuracies`, the held-out reward accuracy.",
        "optimizer": "A torch.optim class name or {class_path, init_args}; full finetuning usually wants a lower "
                     "lr (5e-7 .. 5e-6) than LoRA.",
    },
)
@with_flags("lora", LoRASettings, prefix="lora_")
def finetune_dpo(
    method: Literal["lora", "full"] = "lora",
    loss: Literal["dpo", "ipo", "simpo"] = "dpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    precompute_reference: bool = False,
    quantize: Optional[QuantizeMode] = None,
    lora: Optional[dict[str, Any]] = None,
    *,
    job: FinetuneJob,
) -> TrainResult:
    """Preference-tune a model (DPO, IPO or SimPO) on chosen/rejected reply pairs: `--data Preference --data.json_path FILE`.

    Args:
        method: `lora` (QLoRA with `--quantize`): the reference model is the same model with its LoRA
            switched off, no second copy. `full`: every weight trains; the reference is a frozen copy of the
            initial model, or none with `--precompute_reference true`.
        loss: `dpo` (sigmoid; `--label_smoothing` gives cDPO), `ipo`, or `simpo` (reference-free,
            length-normalised, margin `--gamma`).
        beta: The loss temperature (TRL's default 0.1; SimPO's paper uses 2.0-2.5).
        label_smoothing: Probability that a pair's preference is flipped (dpo, simpo); 0: plain DPO.
        gamma: SimPO's target reward margin (TRL's default 0.5).
        precompute_reference: Score every pair with the initial model once before training (cached as
            `out_dir/reference_logps.safetensors`, reused on resume), instead of a reference forward per step.
        quantize: QLoRA: store the frozen base weights with bitsandbytes (`bnb.nf4`, `bnb.nf4-dq`,
            `bnb.fp4`, `bnb.int8-training`); LoRA only.
    """
    from litllm.data.preference import Preference
    from litllm.preference import PreferenceSettings

    if not isinstance(job.data, Preference):
        raise LitLLMError("--data: finetune_dpo needs preference pairs: --data Preference --data.json_path FILE")
    if method not in ("lora", "full"):
        raise LitLLMError(f"--method: expected lora or full, got {method!r}")
    settings = PreferenceSettings(loss, beta, label_smoothing, gamma)
    settings.validate()
    settings_lora = None
    if method == "lora":
        settings_lora = LoRASettings(**lora)
    elif quantize is not None:
        raise LitLLMError("--quantize needs --method lora (QLoRA): a fully finetuned model can't keep a quantized base")
    return _launch(replace(job, method=method, quantize=quantize, lora=settings_lora, preference=settings,
                           precompute_reference=precompute_reference))


@finetune_command(
    None, "out/finetune/grpo", train=GRPO_TRAIN, eval=GRPO_EVAL, optimizer=GRPO_OPTIMIZER,
    docs={
        "checkpoint_dir": "The converted model folder to start from (usually an instruction-tuned one).",
        "data": "The prompts: `--data Prompts --data.json_path prompts.jsonl` (see `litllm.data.prompts`).",
        "train": "Training settings (batch sizes count prompts, each sampled `--num_generations` times).",
        "eval": "Validation settings; validation samples the held-out prompts and reports `val_reward`.",
        "optimizer": "A torch.optim class name or {class_path, init_args}.",
    },
)
@with_flags("lora", LoRASettings, prefix="lora_")
def finetune_grpo(
    reward: Optional[list[str]] = None,
    reward_weights: Optional[list[float]] = None,
    format_pattern: str = r"<think>.*?</think>\s*<answer>.*?</answer>",
    length_target: int = 256,
    num_generations: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: Optional[int] = None,
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo",
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    num_iterations: int = 1,
    mask_truncated_completions: bool = False,
    method: Literal["lora", "full"] = "lora",
    quantize: Optional[QuantizeMode] = None,
    lora: Optional[dict[str, Any]] = None,
    *,
    job: FinetuneJob,
) -> TrainResult:
    """Reinforce a model with rewards a program checks (GRPO): sample completions, score them, raise the better ones.

    Args:
        reward: A reward function, repeatable: `accuracy` (the record's `answer` against the completion's final
            answer), `format` (`--format_pattern`), `length` (a penalty past `--length_target` tokens), or your own
            `file.py:function` / `package.module:function`, called as `fn(prompts, completions, completion_ids,
            **record_fields) -> list[float]` (TRL's signature).
        reward_weights: One weight per `--reward` (default 1 each); the reward is their weighted sum.
        format_pattern: The regex the `format` reward matches the whole completion against.
        length_target: Completion tokens past which the `length` reward falls (to -1 at twice as many).
        num_generations: Completions sampled per prompt (the group whose rewards are compared).
        max_new_tokens: Completion length limit in tokens.
        temperature: Sampling temperature of the rollouts (and of the log-probs the loss uses).
        top_p: Nucleus sampling threshold of the rollouts.
        top_k: Sample among the k most likely tokens only (unset: all).
        loss_type: `dapo` (TRL's default: token-level mean over the batch), `grpo` (mean of per-completion means),
            `bnpo` (token mean per micro-batch), `dr_grpo` (sum / (completions x max_new_tokens)).
        epsilon: Lower clipping bound of the importance ratio (1 - epsilon); the upper one too unless `--epsilon_high`.
        epsilon_high: Upper clipping bound (1 + epsilon_high); DAPO uses 0.28.
        beta: Weight of the KL penalty to the reference model (0: no reference pass at all; with LoRA the
            reference is the model with its adapters switched off).
        scale_rewards: Divide advantages by the std of the prompt's group (`group`), of the batch (`batch`), or not.
        num_iterations: Optimizer steps per generated batch (later steps use importance ratios).
        mask_truncated_completions: Leave completions cut at `--max_new_tokens` out of the loss.
        method: `lora` (QLoRA with `--quantize`) or `full`.
        quantize: QLoRA: store the frozen base weights with bitsandbytes (`bnb.nf4`, `bnb.nf4-dq`, `bnb.fp4`,
            `bnb.int8-training`); LoRA only.
    """
    from litllm.data.prompts import Prompts
    from litllm.grpo.loss import GRPOSettings
    from litllm.grpo.rewards import load_rewards

    if not isinstance(job.data, Prompts):
        raise LitLLMError("--data: finetune_grpo needs prompts: --data Prompts --data.json_path FILE")
    if method not in ("lora", "full"):
        raise LitLLMError(f"--method: expected lora or full, got {method!r}")
    if job.train.global_batch_size is None:
        raise LitLLMError("--train.global_batch_size: finetune_grpo needs it set (prompts per optimizer step)")
    if job.run.strategy == "fsdp":
        raise LitLLMError("--strategy: finetune_grpo does not support FSDP yet; on several devices use --strategy ddp")
    settings = GRPOSettings(num_generations, max_new_tokens, temperature, top_p, top_k, loss_type, epsilon, epsilon_high,
                            beta, scale_rewards, num_iterations, mask_truncated_completions)
    settings.validate()
    rewards = load_rewards(reward or [], reward_weights, format_pattern, length_target)
    settings_lora = None
    if method == "lora":
        settings_lora = LoRASettings(**lora)
    elif quantize is not None:
        raise LitLLMError("--quantize needs --method lora (QLoRA): a fully finetuned model can't keep a quantized base")
    return _launch(replace(job, method=method, quantize=quantize, lora=settings_lora,
                           grpo={"settings": settings, "rewards": rewards}))


finetune_grpo.repeatable_flags = ("--reward", "--reward_weights")  # `--reward a --reward b` (see litllm.__main__)


# ---------------------------------------------------------------------- shared setup
def _launch(job: FinetuneJob) -> Any:
    """Validate the arguments (before any process starts or anything is written), then launch `main`."""
    from litllm.config import Config
    from litllm.train.fabric import make_fabric
    from litllm.train.loggers import check_logger_name
    from litllm.model_folder import check_model_folder

    run = job.run
    job.checkpoint_dir = check_model_folder(job.checkpoint_dir)
    job.out_dir = Path(job.out_dir)
    config = Config.from_checkpoint(job.checkpoint_dir)
    check_logger_name(run.logger_name)
    if job.quantize is not None and job.quantize not in _BNB_MODE:
        raise LitLLMError(f"--quantize: expected one of {', '.join(_BNB_MODE)}, got {job.quantize!r}")
    if job.adapter is not None and not 0 <= job.adapter.start_layer < config.n_layer:
        raise LitLLMError(
            f"--adapter_start_layer: expected 0..{config.n_layer - 1} for {job.checkpoint_dir} ({config.n_layer} "
            f"layers), got {job.adapter.start_layer}"
        )
    if job.lora is not None and job.lora.head and config.tie_embeddings:
        raise LitLLMError(
            f"--lora_head: {job.checkpoint_dir} ties its output head to the input embedding, so the head can't get "
            "its own LoRA update; train without --lora_head"
        )
    from litllm.train.checkpoints import resolve_resume
    from litllm.train.loop import check_out_dir_reuse
    from litllm.utils import check_output_dir

    check_output_dir(job.out_dir)
    check_out_dir_reuse(job.out_dir, run.resume)
    job.resume_dir = resolve_resume(run.resume, job.out_dir, config)
    fabric = make_fabric(run.devices, run.num_nodes, run.strategy, run.precision, run.accelerator)
    job.train.gradient_accumulation_iters(fabric.world_size)  # clear error before any process starts
    if job.quantize is not None:
        from litllm.quantize import check_quantize_mode

        check_quantize_mode(_BNB_MODE[job.quantize], fabric.device.type, _dtypes(fabric)[1])
    from litllm.estimate import warn_if_too_large

    # on GPUs: a warning naming the fix if it won't fit (the estimate models plain finetuning, not DPO's
    # 2B-row micro-batches and reference model: for those, its figure would only reassure wrongly)
    if job.preference is None and job.grpo is None:
        warn_if_too_large(f"finetune_{job.method}", job.hparams, fabric, config, build_method)
    return fabric.launch(main, job, config)


def _dtypes(fabric) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of trainable weights, dtype of the computation) for the run's precision."""
    return precision_dtypes(str(getattr(fabric.strategy.precision, "precision", "32-true")))


def main(fabric, job: FinetuneJob, config) -> TrainResult:
    """Runs on every rank after launch: tokenizer, data, model, method, then the shared loop."""
    from litllm.model import GPT
    from litllm.tokenizer import Tokenizer
    from litllm.prompts import prompt_style_yaml
    from litllm.train.loggers import build_logger
    from litllm.train.loop import fit, setup, summary

    checkpoint_dir, out_dir = job.checkpoint_dir, job.out_dir
    resume_dir = job.resume_dir
    tokenizer = Tokenizer(checkpoint_dir)
    data = job.data
    if data is None:
        from litllm.data import Alpaca

        data = Alpaca()
    style = _prompt_style(data, tokenizer)
    base_weights = checkpoint_dir / "lit_model.safetensors"
    fabric.seed_everything(job.run.seed, verbose=False)  # hparams record the seed: no "Seed set to" line

    param_dtype, compute_dtype = _dtypes(fabric)
    if job.quantize is not None:
        # QLoRA: load on the CPU and quantize layer by layer onto the device, so the full-precision
        # base never has to fit in device memory
        model = GPT.from_checkpoint(checkpoint_dir, device="cpu", dtype=compute_dtype)
        initial_weights = None
    else:
        # weights are loaded by the loop: before the transform on one device, after sharding under FSDP
        with fabric.init_module(empty_init=True):
            model = GPT(config)
        initial_weights = base_weights
    method = build_method(
        job.method, lora=job.lora, adapter=job.adapter, base_weights=base_weights,
        quantize=_BNB_MODE[job.quantize] if job.quantize else None, device=fabric.device, param_dtype=param_dtype,
        compute_dtype=compute_dtype,
    )
    method.extra_files["prompt_style.yaml"] = prompt_style_yaml(style)
    if job.preference is not None:
        method = _preference_method(fabric, job, method, config, data, tokenizer, compute_dtype)
    elif job.grpo is not None:
        from litllm.grpo.method import configure_grpo

        method = configure_grpo(fabric, job, method, data, tokenizer, style, compute_dtype)
    else:
        method.after_validation = _sample_reply(data, tokenizer, style, job.eval.max_new_tokens)
    logger = None
    if fabric.global_rank == 0:
        logger = build_logger(job.run.logger_name, out_dir, run_name=out_dir.name, resume=resume_dir is not None)
    trainer = setup(
        fabric, model, method, data, tokenizer, job.train, job.eval, job.optimizer, out_dir, job.run,
        initial_weights=initial_weights, model_files_from=checkpoint_dir, hparams=job.hparams, logger=logger,
        resume_dir=resume_dir,
    )
    result = fit(trainer)
    if trainer.dev_run is not None:  # a dev run's folder is gone: its report was the last word
        return result
    fabric.print(summary(result))
    if job.adapter is None:
        fabric.print(f"Try it: litllm generate {result.final_dir} --prompt \"...\"")
    else:
        fabric.print(f"Load it with litllm.adapter.load_adapter_model({str(result.final_dir)!r})")
    return result


def _preference_method(fabric, job: FinetuneJob, method, config, data, tokenizer, compute_dtype):
    """The finetuning method with a preference loss, and its reference model (see `litllm.preference`)."""
    from litllm import preference as pref

    def initial_model() -> nn.Module:
        from litllm.model import GPT

        reference = GPT.from_checkpoint(job.checkpoint_dir, device=fabric.device, dtype=compute_dtype).eval()
        return reference.requires_grad_(False)

    if job.preference.loss == "simpo":
        reference = None  # reference-free
    elif job.precompute_reference:
        pref.precompute_reference(fabric, data, tokenizer, initial_model, job.out_dir, job.train.micro_batch_size,
                                  job.train.max_seq_length or config.block_size,
                                  weights=Path(job.checkpoint_dir) / "lit_model.safetensors")
        reference = pref.precomputed_reference
    elif job.method == "lora":
        reference = pref.adapters_off_reference
    else:
        reference = pref.frozen_reference(initial_model(), fabric.autocast)
    return replace(method, name=f"{job.preference.loss}_{method.name}", loss=pref.preference_loss(job.preference, reference))


# ---------------------------------------------------------------------- methods
def build_method(
    name: str,
    lora=None,
    adapter=None,
    base_weights: Optional[Path] = None,
    quantize: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    param_dtype: Optional[torch.dtype] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Any:
    """The `litllm.train.loop.Method` of a finetuning method (transform, trainable, export, and the
    extra files of its folders: LoRA's lit_lora.safetensors, the adapters' adapter.yaml).

    LoRA and adapters export from the full-precision base weights in `base_weights` plus the trained
    tensors, so a quantized (QLoRA) or sharded run still yields an exact, dense model folder.
    param_dtype: dtype of the new trainable weights (fp32 under mixed precision);
    compute_dtype: dtype a quantized base computes in.
    """
    from litllm.train.loop import Method

    if name == "full":
        if quantize is not None:
            raise LitLLMError("--quantize needs a method that freezes the base (LoRA or adapters)")
        return Method(name="full")
    if name == "lora":
        return _lora_method(lora, base_weights, quantize, device, param_dtype, compute_dtype)
    if name in ("adapter", "adapter_v2"):
        return _adapter_method(adapter, base_weights, quantize, device, param_dtype, compute_dtype)
    raise ValueError(f"unknown finetuning method {name!r}")


def _quantize_frozen(model: nn.Module, quantize: Optional[str], device, compute_dtype) -> None:
    """QLoRA: every frozen Linear (the base weights) becomes a bitsandbytes layer on `device`."""
    if quantize is None:
        return
    from litllm.quantize import quantize_model

    quantize_model(model, quantize, device, frozen_only=True, compute_dtype=compute_dtype)
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights for CPU inference whenever a layer runs in eval mode
        # (validation), which fails for inputs narrower than a quantization block: training keeps one layout
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.to(device)
    for module in model.modules():
        # the loop gathers state dicts with torch.distributed.checkpoint, which looks every key up as an
        # attribute; bitsandbytes' int8 layer saves `SCB` and `weight_format` keys it has no attributes for
        if type(module).__name__ == "Linear8bitLt" and getattr(module.weight, "SCB", None) is not None:
            module.SCB = module.weight.SCB
            module.weight_format = torch.tensor(0, dtype=torch.uint8)


def _wrapped_key(wrapped: set[str]) -> Callable[[str], str]:
    """Base-checkpoint name -> name in a model whose Linears at `wrapped` paths moved to `<path>.base`."""

    def base_key(name: str) -> str:
        module, _, param = name.rpartition(".")
        return f"{module}.base.{param}" if module in wrapped else name

    return base_key


def _lora_method(lora, base_weights: Path, quantize, device, param_dtype, compute_dtype):
    from litllm.lora import LORA_WEIGHTS, LoRALinear, add_lora, is_lora_parameter, merge_lora_state_dict
    from litllm.train.loop import Method

    layout: dict[str, tuple[list, list, float]] = {}  # LoRA module path -> (parts, enabled, scaling)
    wrapped: set[str] = set()
    trained: dict[str, torch.Tensor] = {}  # the LoRA tensors `export` saw, for final/lit_lora.safetensors

    def transform(model: nn.Module) -> nn.Module:
        on_meta = model.wte.weight.is_meta
        add_lora(model, **asdict(lora), dtype=None if on_meta else param_dtype)
        for path, module in model.named_modules():
            if isinstance(module, LoRALinear):
                layout[path] = (module.parts, module.enabled, module.scaling)
                wrapped.add(path)
        return model

    def export(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        trained.clear()
        trained.update({k: v for k, v in state_dict.items() if is_lora_parameter(k)})
        return merge_lora_state_dict(read_safetensors(base_weights), trained, layout)

    def write_outputs(final_dir: Path) -> None:
        from litllm.model_folder import save_model_weights

        save_model_weights({k: v.contiguous() for k, v in trained.items()}, final_dir / LORA_WEIGHTS)

    return Method(name="lora", transform=transform, trainable=lambda name, _: is_lora_parameter(name),
                  export=export, base_key=_wrapped_key(wrapped),  # `wrapped` is filled by transform
                  write_outputs=write_outputs, after_freeze=functools.partial(
                      _quantize_frozen, quantize=quantize, device=device, compute_dtype=compute_dtype))


def _adapter_method(adapter, base_weights: Path, quantize, device, param_dtype, compute_dtype):
    from litllm.adapter import AdapterV2Linear, adapter_parameter_names, apply_adapter
    from litllm.train.loop import Method

    names: set[str] = set()  # the trained parameters
    wrapped: set[str] = set()  # adapter v2's wrapped Linears
    base_key = _wrapped_key(wrapped)

    def transform(model: nn.Module) -> nn.Module:
        apply_adapter(model, adapter, dtype=None if model.wte.weight.is_meta else param_dtype)
        names.update(adapter_parameter_names(model))
        wrapped.update(p for p, m in model.named_modules() if isinstance(m, AdapterV2Linear))
        return model

    def export(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the frozen base from its file (dense even if the run quantized it) + the trained tensors,
        # in the base's dtype; a tied head stays stored once (as wte.weight)
        base = {base_key(k): v for k, v in read_safetensors(base_weights).items()}
        dtype = base["wte.weight"].dtype
        base.update({k: state_dict[k].to(dtype) for k in names})
        return base

    return Method(name=f"adapter_v{adapter.version}", transform=transform,
                  trainable=lambda name, _: name in names, export=export, base_key=base_key,
                  after_freeze=functools.partial(_quantize_frozen, quantize=quantize, device=device,
                                                 compute_dtype=compute_dtype),
                  extra_files={ADAPTER_SPEC: adapter_settings_yaml(adapter)})


# ---------------------------------------------------------------------- prompt style and samples
def _prompt_style(data, tokenizer):
    from litllm.data.sft import resolve_prompt_style

    return resolve_prompt_style(getattr(data, "prompt_style", None), tokenizer)


def _sample_reply(data, tokenizer, style, max_new_tokens: Optional[int]):
    """`after_validation` hook: greedily continue the first validation prompt and print the reply."""
    if not max_new_tokens:
        return None

    def after_validation(fabric, model, step: int) -> None:
        from litllm.engine import default_stops, generate_ids
        from litllm.train.fabric import unwrap

        dataset = getattr(data, "val_dataset", None)
        if not dataset:
            return
        sample = dataset[0]
        reply_at = (sample["labels"] != getattr(data, "ignore_index", -100)).nonzero()
        if not len(reply_at):
            return
        prompt = sample["input_ids"][: int(reply_at[0]) + 1]  # labels[t] is the target of input_ids[t]
        module = unwrap(model)
        was_training = module.training
        module.eval()
        room = module.max_seq_length - len(prompt)
        tokens = generate_ids(module, prompt.tolist(), min(max_new_tokens, room), tokenizer=tokenizer,
                              **default_stops(tokenizer, style)) if room > 0 else []
        module.train(was_training)
        fabric.print(f"Step {step} sample: {tokenizer.decode(prompt)!r} -> {tokenizer.decode(torch.tensor(tokens))!r}")

    return after_validation
