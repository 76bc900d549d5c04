"""`litllm finetune_lora` (also `finetune`), `finetune_full`, `finetune_adapter`, `finetune_adapter_v2`, `finetune_dpo`,
`finetune_grpo`.

    litllm finetune_lora checkpoints/meta-llama/Llama-3.2-1B --data JSON --data.json_path my_data.json
    litllm finetune_lora checkpoints/meta-llama/Llama-3.1-8B --quantize bnb.nf4 --config config_hub/finetune/llama-3.1-8b/qlora.yaml

Each command is one job dataclass (its flags, typed: `FinetuneJob` holds the shared ones, a subclass adds the
method's own before `_: KW_ONLY` and may redeclare a shared one for another default or help text) and one
function `finetune_x(job: XJob)` made a command by `litllm.flags.job_command`, which publishes the job's fields
as today's flat flags and binds them once. The job travels as itself: `launch` checks it and starts `main` on
every rank, the job builds its `Method` (`build_method`: the builders live beside their method, `lora_method`
in lora.py, `adapter_method` in adapter.py, `preference_method` in preference.py, `grpo_method` in
grpo/method.py), `litllm estimate` plans from it, and the loop's checkpoint writer flattens it into
`hyperparameters.yaml`. A new command: its job class (fields with attribute docstrings, `command`/`name`,
`build_method`, optionally `check` and `finish_method`), its function, and its line in
`litllm.__main__.COMMANDS`.

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

import copy
from dataclasses import KW_ONLY, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import torch

from litllm.data.base import DataModule
from litllm.errors import LitLLMError
from litllm.flags import flat, job_command, repeatable
from litllm.grpo.loss import GRPOSettings
from litllm.lora import FLAG_PREFIX as LORA_FLAGS, LoRASettings
from litllm.model_folder import AdapterSettings
from litllm.precision import precision_dtypes
from litllm.preference import PreferenceSettings
from litllm.train.args import EvalArgs, RunArgs, TrainArgs
from litllm.train.loop import Method, TrainResult
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


def _default(value: Any) -> Any:
    """A field default of a (mutable) value: every job gets its own copy."""
    return field(default_factory=lambda: copy.deepcopy(value))


# ---------------------------------------------------------------------- the jobs: a command's flags, typed
@dataclass
class FinetuneJob:
    """The flags every `finetune_*` command shares; a command's job extends it with the method's own fields
    (declared before `_: KW_ONLY`, so its flags come between `out_dir` and `data`) and may redeclare a field
    to change its default or help. The job builds its method (`build_method`, also for `litllm estimate`)."""

    checkpoint_dir: Path
    """The converted base model folder (`litllm download` / `convert_to_litllm`)."""
    out_dir: Path = Path("out/finetune")
    """Where checkpoints (`step-XXXXXXXX/`, `final/`) and logs are written."""
    _: KW_ONLY
    data: Optional[DataModule] = None
    """The data module (default `Alpaca`), e.g. `--data JSON --data.json_path my_data.json`."""
    train: TrainArgs = _default(FINETUNE_TRAIN)
    """Training settings (batch sizes, budget, schedule, saving)."""
    eval: EvalArgs = _default(FINETUNE_EVAL)
    """Validation settings (`--eval.max_new_tokens` prints a sample reply at each validation)."""
    optimizer: OptimizerSpec = _default(PEFT_OPTIMIZER)
    """A torch.optim class name (`--optimizer AdamW --optimizer.lr 2e-4`) or {class_path, init_args}."""
    run: RunArgs = flat("", RunArgs, lambda: RunArgs(seed=1337))

    command: ClassVar[str] = "finetune_full"
    name: ClassVar[str] = "full"
    """The method: "full", "lora", "adapter", "adapter_v2"."""

    def __post_init__(self) -> None:
        from litllm.train.optimizer import describe

        # hyperparameters.yaml records it as plain data: the CLI's (jsonargparse's partial) or a class as
        # {class_path, init_args}, a name or a mapping as given
        if not isinstance(self.optimizer, (str, dict)):
            self.optimizer = describe(self.optimizer)

    def check(self, config) -> None:
        """Fail clearly before launch on settings this model can't take."""

    def build_method(self, base_weights: Optional[Path] = None, device: Any = "cpu",
                     param_dtype: Optional[torch.dtype] = None, compute_dtype: Optional[torch.dtype] = None,
                     quantized: bool = True) -> Method:
        """The job's `Method` (`quantized=False`: with a dense base, as `litllm estimate`'s fake step runs it)."""
        return Method(name="full")

    def finish_method(self, method: Method, fabric, config, data, tokenizer, out_dir: Path) -> Method:
        """On every rank, with the run's data: the method as it trains (here: a sample reply after each validation)."""
        from litllm.data.sft import resolve_prompt_style

        style = resolve_prompt_style(getattr(data, "prompt_style", None), tokenizer)
        return replace(method, after_validation=_sample_reply(data, tokenizer, style, self.eval.max_new_tokens))

    def bnb_mode(self, quantized: bool = True) -> Optional[str]:
        """The bitsandbytes mode the frozen base is stored in, from the `--quantize` of a job that has the flag
        (None: dense)."""
        quantize = getattr(self, "quantize", None)
        if not quantized or quantize is None:
            return None
        if quantize not in _BNB_MODE:
            raise LitLLMError(f"--quantize: expected one of {', '.join(_BNB_MODE)}, got {quantize!r}")
        return _BNB_MODE[quantize]


@dataclass
class FullJob(FinetuneJob):
    out_dir: Path = Path("out/finetune/full")
    _: KW_ONLY
    optimizer: OptimizerSpec = _default(FULL_OPTIMIZER)
    """A torch.optim class name (`--optimizer AdamW --optimizer.lr 2e-5`) or {class_path, init_args}."""


@dataclass
class LoRAJob(FinetuneJob):
    out_dir: Path = Path("out/finetune/lora")
    quantize: Optional[QuantizeMode] = None
    """QLoRA: store the frozen base weights with bitsandbytes (`bnb.nf4`, `bnb.nf4-dq`, `bnb.fp4`,
    `bnb.int8-training`); the LoRA weights train in `precision`."""
    lora: LoRASettings = flat(LORA_FLAGS, LoRASettings)

    command: ClassVar[str] = "finetune_lora"
    name: ClassVar[str] = "lora"

    def check(self, config) -> None:
        _check_lora_head(self, config)

    def build_method(self, base_weights=None, device="cpu", param_dtype=None, compute_dtype=None, quantized=True):
        from litllm.lora import lora_method

        return lora_method(self.lora, base_weights, self.bnb_mode(quantized), device, param_dtype, compute_dtype)


def _check_lora_head(job, config) -> None:
    if job.lora.head and config.tie_embeddings:
        raise LitLLMError(
            f"--lora_head: {job.checkpoint_dir} ties its output head to the input embedding, so the head can't "
            "get its own LoRA update; train without --lora_head"
        )


@dataclass
class AdapterJob(FinetuneJob):
    out_dir: Path = Path("out/finetune/adapter")
    quantize: Optional[QuantizeMode] = None
    """Store the frozen base weights with bitsandbytes (`bnb.nf4`, `bnb.nf4-dq`, `bnb.fp4`, `bnb.int8-training`)."""
    adapter_start_layer: int = 2
    """First block (0-based) that gets a learned prefix."""
    adapter_prefix_length: int = 10
    """Learned prefix tokens per adapted block."""

    command: ClassVar[str] = "finetune_adapter"
    name: ClassVar[str] = "adapter"
    version: ClassVar[int] = 1

    @property
    def adapter(self) -> AdapterSettings:
        return AdapterSettings(self.version, self.adapter_start_layer, self.adapter_prefix_length)

    def check(self, config) -> None:
        if not 0 <= self.adapter_start_layer < config.n_layer:
            raise LitLLMError(
                f"--adapter_start_layer: expected 0..{config.n_layer - 1} for {self.checkpoint_dir} ({config.n_layer} "
                f"layers), got {self.adapter_start_layer}"
            )

    def build_method(self, base_weights=None, device="cpu", param_dtype=None, compute_dtype=None, quantized=True):
        from litllm.adapter import adapter_method

        return adapter_method(self.adapter, base_weights, self.bnb_mode(quantized), device, param_dtype, compute_dtype)


@dataclass
class AdapterV2Job(AdapterJob):
    out_dir: Path = Path("out/finetune/adapter-v2")

    command: ClassVar[str] = "finetune_adapter_v2"
    name: ClassVar[str] = "adapter_v2"
    version: ClassVar[int] = 2


class LoRAOrFull:
    """The method of a job with the fields `method` ("lora" or "full"), `quantize` and `lora` (DPO, GRPO)."""

    @property
    def name(self) -> str:
        return self.method

    def check_method(self) -> None:
        """The command's check of `--method` and `--quantize`, before launch."""
        if self.method not in ("lora", "full"):
            raise LitLLMError(f"--method: expected lora or full, got {self.method!r}")
        if self.method == "full" and self.quantize is not None:
            raise LitLLMError(
                "--quantize needs --method lora (QLoRA): a fully finetuned model can't keep a quantized base"
            )

    def check(self, config) -> None:
        if self.method == "lora":
            _check_lora_head(self, config)

    def build_method(self, base_weights=None, device="cpu", param_dtype=None, compute_dtype=None, quantized=True):
        from litllm.lora import lora_method

        if self.method == "full":
            return Method(name="full")
        return lora_method(self.lora, base_weights, self.bnb_mode(quantized), device, param_dtype, compute_dtype)


@dataclass
class DPOJob(LoRAOrFull, FinetuneJob):
    checkpoint_dir: Path
    """The converted model folder to start from (usually an instruction-tuned one)."""
    out_dir: Path = Path("out/finetune/dpo")
    method: Literal["lora", "full"] = "lora"
    """`lora` (QLoRA with `--quantize`): the reference model is the same model with its LoRA switched off, no
    second copy. `full`: every weight trains; the reference is a frozen copy of the initial model, or none with
    `--precompute_reference true`."""
    preference: PreferenceSettings = flat("", PreferenceSettings)
    precompute_reference: bool = False
    """Score every pair with the initial model once before training (cached as
    `out_dir/reference_logps.safetensors`, reused on resume), instead of a reference forward per step."""
    quantize: Optional[QuantizeMode] = None
    """QLoRA: store the frozen base weights with bitsandbytes (`bnb.nf4`, `bnb.nf4-dq`, `bnb.fp4`,
    `bnb.int8-training`); LoRA only."""
    lora: LoRASettings = flat(LORA_FLAGS, LoRASettings)
    _: KW_ONLY
    data: Optional[DataModule] = None
    """The preference pairs: `--data Preference --data.json_path pairs.json` (see `litllm.data.preference`)."""
    train: TrainArgs = _default(DPO_TRAIN)
    """Training settings (batch sizes count pairs; `max_seq_length` bounds prompt + the longer reply)."""
    eval: EvalArgs = _default(DPO_EVAL)
    """Validation settings; validation reports `val_rewards/accuracies`, the held-out reward accuracy."""
    optimizer: OptimizerSpec = _default(DPO_OPTIMIZER)
    """A torch.optim class name or {class_path, init_args}; full finetuning usually wants a lower lr (5e-7 .. 5e-6)
    than LoRA."""

    command: ClassVar[str] = "finetune_dpo"

    def finish_method(self, method, fabric, config, data, tokenizer, out_dir):
        from litllm.preference import preference_method

        return preference_method(
            method, self.preference, fabric, data, tokenizer, checkpoint_dir=self.checkpoint_dir, out_dir=out_dir,
            precompute=self.precompute_reference, micro_batch_size=self.train.micro_batch_size,
            max_seq_length=self.train.max_seq_length or config.block_size, compute_dtype=_dtypes(fabric)[1],
        )


@dataclass
class GRPOJob(LoRAOrFull, FinetuneJob):
    checkpoint_dir: Path
    """The converted model folder to start from (usually an instruction-tuned one)."""
    out_dir: Path = Path("out/finetune/grpo")
    reward: Optional[list[str]] = repeatable()
    """A reward function, repeatable: `accuracy` (the record's `answer` against the completion's final
    answer), `format` (`--format_pattern`), `length` (a penalty past `--length_target` tokens), or your own
    `file.py:function` / `package.module:function`, called as `fn(prompts, completions, completion_ids,
    **record_fields) -> list[float]` (TRL's signature)."""
    reward_weights: Optional[list[float]] = repeatable()
    """One weight per `--reward` (default 1 each); the reward is their weighted sum."""
    format_pattern: str = r"<think>.*?</think>\s*<answer>.*?</answer>"
    """The regex the `format` reward matches the whole completion against."""
    length_target: int = 256
    """Completion tokens past which the `length` reward falls (to -1 at twice as many)."""
    grpo: GRPOSettings = flat("", GRPOSettings)
    method: Literal["lora", "full"] = "lora"
    """`lora` (QLoRA with `--quantize`) or `full`."""
    quantize: Optional[QuantizeMode] = None
    """QLoRA: store the frozen base weights with bitsandbytes (`bnb.nf4`, `bnb.nf4-dq`, `bnb.fp4`,
    `bnb.int8-training`); LoRA only."""
    lora: LoRASettings = flat(LORA_FLAGS, LoRASettings)
    _: KW_ONLY
    data: Optional[DataModule] = None
    """The prompts: `--data Prompts --data.json_path prompts.jsonl` (see `litllm.data.prompts`)."""
    train: TrainArgs = _default(GRPO_TRAIN)
    """Training settings (batch sizes count prompts, each sampled `--num_generations` times)."""
    eval: EvalArgs = _default(GRPO_EVAL)
    """Validation settings; validation samples the held-out prompts and reports `val_reward`."""
    optimizer: OptimizerSpec = _default(GRPO_OPTIMIZER)
    """A torch.optim class name or {class_path, init_args}."""

    command: ClassVar[str] = "finetune_grpo"

    def rewards(self) -> list:
        """The run's `litllm.grpo.rewards.Reward`s (a bad `--reward*` flag: a clear error)."""
        from litllm.grpo.rewards import load_rewards

        return load_rewards(self.reward or [], self.reward_weights, self.format_pattern, self.length_target)

    def finish_method(self, method, fabric, config, data, tokenizer, out_dir):
        from litllm.data.sft import resolve_prompt_style
        from litllm.grpo.method import grpo_method

        style = resolve_prompt_style(getattr(data, "prompt_style", None), tokenizer)
        return grpo_method(
            method, self.grpo, self.rewards(), fabric, data, tokenizer, style, checkpoint_dir=self.checkpoint_dir,
            out_dir=out_dir, seed=self.run.seed, accumulation=self.train.gradient_accumulation_iters(fabric.world_size),
            compute_dtype=_dtypes(fabric)[1], quantized=self.bnb_mode() is not None,
            rollout_steps=self.rollout_decode_steps(),
        )

    def rollout_decode_steps(self) -> Optional[int]:
        """How many decode steps the run's training rollouts take at least (None: no --train.max_steps): one
        rollout per generation batch, of up to max_new_tokens steps, each for all its rows at once."""
        if self.train.max_steps is None:
            return None
        return -(-self.train.max_steps // self.grpo.num_iterations) * self.grpo.max_new_tokens


# ---------------------------------------------------------------------- the commands
@job_command
def finetune_lora(job: LoRAJob) -> TrainResult:
    """Finetune a model with LoRA (QLoRA with `--quantize`): train low-rank updates of frozen weights."""
    return launch(job)


@job_command
def finetune_full(job: FullJob) -> TrainResult:
    """Finetune every weight of a model."""
    return launch(job)


@job_command
def finetune_adapter(job: AdapterJob) -> TrainResult:
    """Finetune a model with LLaMA-Adapter: learned, zero-gated prefixes in the later layers' attention."""
    return launch(job)


@job_command
def finetune_adapter_v2(job: AdapterV2Job) -> TrainResult:
    """Finetune a model with LLaMA-Adapter v2: gated prefixes plus a scale and bias on every Linear, and the norms."""
    return launch(job)


@job_command
def finetune_dpo(job: DPOJob) -> TrainResult:
    """Preference-tune a model (DPO, IPO or SimPO) on chosen/rejected reply pairs: `--data Preference --data.json_path FILE`."""
    from litllm.data.preference import Preference

    if not isinstance(job.data, Preference):
        raise LitLLMError("--data: finetune_dpo needs preference pairs: --data Preference --data.json_path FILE")
    job.check_method()
    job.preference.validate()
    return launch(job)


@job_command
def finetune_grpo(job: GRPOJob) -> TrainResult:
    """Reinforce a model with rewards a program checks (GRPO): sample completions, score them, raise the better ones."""
    from litllm.data.prompts import Prompts

    if not isinstance(job.data, Prompts):
        raise LitLLMError("--data: finetune_grpo needs prompts: --data Prompts --data.json_path FILE")
    job.check_method()
    if job.train.global_batch_size is None:
        raise LitLLMError("--train.global_batch_size: finetune_grpo needs it set (prompts per optimizer step)")
    job.grpo.validate()
    job.rewards()  # a bad --reward / --reward_weights fails here, before launch
    return launch(job)


# ---------------------------------------------------------------------- launch and the per-rank main
def launch(job: FinetuneJob) -> Any:
    """Validate the job (before any process starts or anything is written), then launch `main` on every rank."""
    from litllm.config import Config
    from litllm.estimate import warn_if_too_large
    from litllm.model_folder import check_model_folder
    from litllm.train.checkpoints import resolve_resume
    from litllm.train.fabric import make_fabric
    from litllm.train.fast_dev_run import run_folder
    from litllm.train.loggers import check_logger_name
    from litllm.train.loop import check_out_dir_reuse
    from litllm.utils import check_output_dir

    run = job.run
    with run_folder(run, job.out_dir) as (out_dir, resume):
        job = replace(job, checkpoint_dir=check_model_folder(job.checkpoint_dir), out_dir=Path(job.out_dir))
        config = Config.from_checkpoint(job.checkpoint_dir)
        check_logger_name(run.logger_name)
        quantize = job.bnb_mode()
        job.check(config)
        check_output_dir(out_dir)
        check_out_dir_reuse(out_dir, resume)
        resume_dir = resolve_resume(resume, out_dir, config)
        fabric = make_fabric(run.devices, run.num_nodes, run.strategy, run.precision, run.accelerator)
        job.train.gradient_accumulation_iters(fabric.world_size)  # clear error before any process starts
        if quantize is not None:
            from litllm.quantize import check_quantize_mode

            check_quantize_mode(quantize, fabric.device.type, _dtypes(fabric)[1])
        # on GPUs: a warning naming the fix if it won't fit (DPO's 2 rows per pair, GRPO's rollout KV cache and
        # a full run's reference copy included)
        warn_if_too_large(job.command, job, fabric, config)
        return fabric.launch(main, job, config, out_dir, resume_dir)


def _dtypes(fabric) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of trainable weights, dtype of the computation) for the run's precision."""
    return precision_dtypes(str(getattr(fabric.strategy.precision, "precision", "32-true")))


def main(fabric, job: FinetuneJob, config, out_dir: Path, resume_dir: Optional[Path]) -> TrainResult:
    """Runs on every rank after launch: tokenizer, data, model, method, then the shared loop (writing `out_dir`,
    resuming from `resume_dir`)."""
    from litllm.data.sft import resolve_prompt_style
    from litllm.model import GPT
    from litllm.prompts import prompt_style_yaml
    from litllm.tokenizer import Tokenizer
    from litllm.train.loggers import build_logger
    from litllm.train.loop import fit, setup, summary

    checkpoint_dir = job.checkpoint_dir
    tokenizer = Tokenizer(checkpoint_dir)
    data = job.data
    if data is None:
        from litllm.data import Alpaca

        data = Alpaca()
    base_weights = checkpoint_dir / "lit_model.safetensors"
    fabric.seed_everything(job.run.seed, verbose=False)  # hparams record the seed: no "Seed set to" line

    param_dtype, compute_dtype = _dtypes(fabric)
    if job.bnb_mode() is not None:
        # QLoRA: load on the CPU and quantize layer by layer onto the device, so the full-precision
        # base never has to fit in device memory
        model = GPT.from_checkpoint(checkpoint_dir, device="cpu", dtype=compute_dtype)
        initial_weights = None
    else:
        # weights are loaded by the loop: before the transform on one device, after sharding under FSDP
        with fabric.init_module(empty_init=True):
            model = GPT(config)
        initial_weights = base_weights
    method = job.build_method(base_weights, fabric.device, param_dtype, compute_dtype)
    style = resolve_prompt_style(getattr(data, "prompt_style", None), tokenizer)
    method.extra_files["prompt_style.yaml"] = prompt_style_yaml(style)
    method = job.finish_method(method, fabric, config, data, tokenizer, out_dir)
    logger = None
    if fabric.global_rank == 0:
        logger = build_logger(job.run.logger_name, out_dir, run_name=out_dir.name, resume=resume_dir is not None)
    trainer = setup(
        fabric, model, method, data, tokenizer, job.train, job.eval, job.optimizer, out_dir, job.run,
        initial_weights=initial_weights, model_files_from=checkpoint_dir, job=job, logger=logger,
        resume_dir=resume_dir,
    )
    result = fit(trainer)
    if trainer.dev_run is not None:  # a dev run's folder is gone: its report was the last word
        return result
    fabric.print(summary(result))
    fabric.print(f"Try it: litllm generate {result.final_dir} --prompt \"...\"")
    if isinstance(job, AdapterJob):  # no plain GPT: GPT.from_checkpoint refuses its adapter weights
        fabric.print(f"From Python: litllm.adapter.load_adapter_model({str(result.final_dir)!r})")
    return result


# ---------------------------------------------------------------------- a sample reply at each validation
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
