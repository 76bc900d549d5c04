"""`litllm pretrain`: train a model from scratch (or continue pretraining a converted one).

    litllm pretrain --config config_hub/pretrain/debug.yaml
    litllm pretrain --model_name pythia-14m --tokenizer_dir checkpoints/EleutherAI/pythia-14m \\
        --data TextFiles --data.train_data_path data/text --train.max_tokens 10_000_000

The training itself is the shared loop (`litllm.train.loop.setup` + `fit`) with the plain "full" method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from litllm.config import Config
from litllm.data.base import DataModule
from litllm.errors import LitLLMError
from litllm.flags import flat, job_command
from litllm.train.args import EvalArgs, RunArgs, TrainArgs
from litllm.train.optimizer import OptimizerSpec

import litllm.data  # noqa: F401  (imports every DataModule class, so `--data TextFiles` resolves)


@dataclass
class PretrainJob:
    """The `pretrain` command's flags, typed."""

    model_name: Optional[str] = None
    """A preset name (`litllm list_models`) to build the model from."""
    model_config: Optional[Config] = None
    """The model's Config fields, instead of a preset (`--model_config.n_layer 6 ...`)."""
    out_dir: Path = Path("out/pretrain")
    """Where checkpoints (`step-XXXXXXXX/`, `final/`), logs and the loss curve are written."""
    initial_checkpoint_dir: Optional[Path] = None
    """A converted model folder to continue pretraining from (its weights, and its config and tokenizer unless given)."""
    data: Optional[DataModule] = None
    """The data module, e.g. `--data TextFiles --data.train_data_path data/text`."""
    train: TrainArgs = field(default_factory=lambda: TrainArgs(
        save_interval=1000, log_interval=1, global_batch_size=512, micro_batch_size=4, lr_warmup_steps=2000,
        max_norm=1.0, min_lr=4e-5,
    ))
    """Training settings (batch sizes, budget, schedule, saving)."""
    eval: EvalArgs = field(default_factory=lambda: EvalArgs(interval=1000, max_iters=100))
    """Validation settings."""
    optimizer: OptimizerSpec = "AdamW"
    """An optimizer class and its arguments: `--optimizer AdamW --optimizer.lr 4e-4`, or in YAML {class_path: AdamW,
    init_args: {lr: 4e-4}}; any torch.optim class or dotted class path."""
    tokenizer_dir: Optional[Path] = None
    """A folder with tokenizer.json (and tokenizer_config.json)."""
    tokenizer_vocab_size: Optional[int] = None
    """Without a tokenizer_dir or initial checkpoint: train a byte-level BPE tokenizer of this size on the training
    text (`TextFiles` data) and save it in out_dir/tokenizer."""
    run: RunArgs = flat("", RunArgs, lambda: RunArgs(devices="auto", seed=42))

    command: ClassVar[str] = "pretrain"
    name: ClassVar[str] = "pretrain"

    def __post_init__(self) -> None:
        from litllm.train.optimizer import describe

        self.optimizer = describe(self.optimizer)  # hyperparameters.yaml records it as {class_path, init_args}


@job_command
def setup(job: PretrainJob) -> None:
    """Pretrain a model."""
    from litllm.train.fabric import make_fabric
    from litllm.train.fast_dev_run import run_folder
    from litllm.train.loggers import check_logger_name
    from litllm.train.loop import check_out_dir_reuse
    from litllm.utils import check_output_dir

    run = job.run
    with run_folder(run, job.out_dir) as (out_dir, resume):
        check_logger_name(run.logger_name)
        config = _model_config(job.model_name, job.model_config, job.initial_checkpoint_dir)
        if job.data is None:
            raise LitLLMError("--data is required, e.g. --data TextFiles --data.train_data_path data/text")
        check_output_dir(out_dir)
        check_out_dir_reuse(out_dir, resume)
        fabric = make_fabric(run.devices, run.num_nodes, run.strategy, run.precision, run.accelerator)
        # clear errors before any process starts or anything is written
        job.train.gradient_accumulation_iters(fabric.world_size)
        resume_dir = _check_inputs(config, out_dir, resume, job.initial_checkpoint_dir, job.tokenizer_dir,
                                   job.tokenizer_vocab_size)
        from litllm.estimate import warn_if_too_large

        warn_if_too_large("pretrain", job, fabric, config)  # on GPUs: a warning naming the fix if it won't fit
        fabric.launch(main, job, config, out_dir, resume_dir)


def main(fabric, job: PretrainJob, config: Config, out_dir: Path, resume_dir: Optional[Path]):
    """Runs on every rank after launch: tokenizer, model, then the shared loop (writing `out_dir`, resuming
    from `resume_dir`)."""
    from litllm.model import GPT
    from litllm.tokenizer import Tokenizer
    from litllm.train.fabric import uses_fsdp
    from litllm.train.loggers import build_logger
    from litllm.train.loop import Method, fit, setup, summary

    tokenizer_dir = job.tokenizer_dir
    initial_weights = None
    if job.initial_checkpoint_dir is not None:
        from litllm.model_folder import check_model_folder

        initial_weights = check_model_folder(job.initial_checkpoint_dir) / "lit_model.safetensors"
        tokenizer_dir = tokenizer_dir or job.initial_checkpoint_dir
    if tokenizer_dir is None:
        tokenizer_dir = _trained_tokenizer(fabric, job.data, out_dir, job.tokenizer_vocab_size, config)
    tokenizer = Tokenizer(tokenizer_dir)

    fabric.seed_everything(job.run.seed, verbose=False)  # hparams record the seed: no "Seed set to" line
    with fabric.init_module(empty_init=uses_fsdp(fabric)):
        model = GPT(config)
    if not any(p.is_meta for p in model.parameters()):
        model.reset_parameters()  # on meta (FSDP), materialisation after sharding initialises it

    # a pretrained model continues plain text: say so, unless the tokenizer's folder brings a style
    has_style = (Path(tokenizer_dir) / "prompt_style.yaml").is_file()
    method = Method(name="pretrain", extra_files={} if has_style else {"prompt_style.yaml": "name: default\n"})
    logger = None
    if fabric.global_rank == 0:
        logger = build_logger(job.run.logger_name, out_dir, run_name=out_dir.name, resume=resume_dir is not None)
    trainer = setup(
        fabric, model, method, job.data, tokenizer, job.train, job.eval, job.optimizer, out_dir, job.run,
        initial_weights=initial_weights, model_files_from=Path(tokenizer_dir), job=job, logger=logger,
        resume_dir=resume_dir,
    )
    result = fit(trainer)
    if trainer.dev_run is None:  # a dev run's folder is gone: its report was the last word
        fabric.print(summary(result))
        fabric.print(f"Try it: litllm generate {result.final_dir} --prompt \"...\"")
    return result


def _check_inputs(config, out_dir, resume, initial_checkpoint_dir, tokenizer_dir, tokenizer_vocab_size) -> Optional[Path]:
    """Fail clearly before launch; returns the checkpoint to resume from (None: start fresh)."""
    from litllm.tokenizer import Tokenizer
    from litllm.train.checkpoints import resolve_resume
    from litllm.model_folder import check_model_folder

    resume_dir = resolve_resume(resume, out_dir, config)
    if initial_checkpoint_dir is not None:
        check_model_folder(initial_checkpoint_dir)
    tokenizer_dir = tokenizer_dir or initial_checkpoint_dir
    if tokenizer_dir is not None:
        vocab = Tokenizer(tokenizer_dir).vocab_size
    elif tokenizer_vocab_size is not None:
        vocab = tokenizer_vocab_size
    else:
        raise LitLLMError("pretraining needs a tokenizer: --tokenizer_dir, --initial_checkpoint_dir or --tokenizer_vocab_size")
    if vocab > config.padded_vocab_size:
        raise LitLLMError(
            f"the tokenizer's vocabulary ({vocab} tokens) exceeds the model's embedding table "
            f"({config.padded_vocab_size} rows): use a model with vocab_size >= {vocab} or a smaller tokenizer"
        )
    return resume_dir


def _model_config(model_name: Optional[str], model_config: Optional[Config], initial_checkpoint_dir: Optional[Path]) -> Config:
    if model_name is not None and model_config is not None:
        raise LitLLMError("give only one of --model_name and --model_config")
    if model_name is not None:
        return Config.from_name(model_name)
    if model_config is not None:
        return model_config
    if initial_checkpoint_dir is not None:
        return Config.from_checkpoint(initial_checkpoint_dir)
    raise LitLLMError("pretraining needs a model: --model_name, --model_config or --initial_checkpoint_dir")


def _trained_tokenizer(fabric, data: DataModule, out_dir: Path, vocab_size: int, config: Config) -> Path:
    """Train a byte-level BPE tokenizer on the run's training text (once, on global rank 0)."""
    from litllm.data.train_tokenizer import train_tokenizer

    folder = out_dir / "tokenizer"
    source = getattr(data, "train_data_path", None)
    if source is None:
        raise LitLLMError(f"--tokenizer_vocab_size: {type(data).__name__} has no train_data_path to train a tokenizer on; give --tokenizer_dir")
    if fabric.global_rank == 0 and not (folder / "tokenizer.json").is_file():
        # validated before anything is written: a missing or empty data folder fails here cleanly
        from litllm.data.text_files import list_files

        list_files(source, getattr(data, "glob", "**/*.txt"), getattr(data, "max_files", None))
        # train_tokenizer writes a new folder whole or not at all (and names it, not a temporary folder)
        train_tokenizer(
            data_path=source, out_dir=folder, vocab_size=vocab_size, glob=getattr(data, "glob", "**/*.txt"),
            max_files=getattr(data, "max_files", None),
        )
    fabric.barrier()
    return folder
