"""`litllm pretrain`: train a model from scratch (or continue pretraining a converted one).

    litllm pretrain --config config_hub/pretrain/debug.yaml
    litllm pretrain --model_name pythia-14m --tokenizer_dir checkpoints/EleutherAI/pythia-14m \\
        --data TextFiles --data.train_data_path data/text --train.max_tokens 10_000_000

The training itself is the shared loop (`litllm.train.loop.run`) with the plain "full" method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from litllm.config import Config
from litllm.data.base import DataModule
from litllm.errors import LitLLMError
from litllm.train.args import EvalArgs, TrainArgs
from litllm.train.optimizer import OptimizerSpec

import litllm.data  # noqa: F401  (imports every DataModule class, so `--data TextFiles` resolves)


def setup(
    model_name: Optional[str] = None,
    model_config: Optional[Config] = None,
    out_dir: Path = Path("out/pretrain"),
    precision: Optional[str] = None,
    initial_checkpoint_dir: Optional[Path] = None,
    resume: Union[bool, Literal["auto"], Path] = False,
    data: Optional[DataModule] = None,
    train: TrainArgs = TrainArgs(
        save_interval=1000, log_interval=1, global_batch_size=512, micro_batch_size=4, lr_warmup_steps=2000,
        max_norm=1.0, min_lr=4e-5,
    ),
    eval: EvalArgs = EvalArgs(interval=1000, max_iters=100),
    optimizer: OptimizerSpec = "AdamW",
    devices: Union[int, str] = "auto",
    num_nodes: int = 1,
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto",
    accelerator: Literal["auto", "cpu", "cuda", "gpu"] = "auto",
    tokenizer_dir: Optional[Path] = None,
    tokenizer_vocab_size: Optional[int] = None,
    logger_name: Literal["csv", "tensorboard", "wandb"] = "csv",
    seed: int = 42,
    compile: bool = False,
    activation_checkpointing: bool = False,
) -> None:
    """Pretrain a model.

    Args:
        model_name: A preset name (`litllm list_models`) to build the model from.
        model_config: The model's Config fields, instead of a preset (`--model_config.n_layer 6 ...`).
        out_dir: Where checkpoints (`step-XXXXXXXX/`, `final/`), logs and the loss curve are written.
        precision: `bf16-mixed` (default on GPUs), `32-true` (default on CPUs), `bf16-true`, `16-mixed`.
        initial_checkpoint_dir: A converted model folder to continue pretraining from (its weights, and
            its config and tokenizer unless given).
        resume: `auto`: continue from the newest complete checkpoint in out_dir (or start fresh);
            a checkpoint path; false: start fresh.
        data: The data module, e.g. `--data TextFiles --data.train_data_path data/text`.
        train: Training settings (batch sizes, budget, schedule, saving).
        eval: Validation settings.
        optimizer: An optimizer class and its arguments: `--optimizer AdamW --optimizer.lr 4e-4`, or in
            YAML {class_path: AdamW, init_args: {lr: 4e-4}}; any torch.optim class or dotted class path.
        devices: Devices per node (`auto`: every visible GPU, or 1 CPU process).
        num_nodes: Number of nodes (with SLURM, launch with `srun`).
        strategy: `auto` (one device: single; more: fsdp), `single`, `ddp` or `fsdp` (FSDP2, Block-wise shards).
        accelerator: `auto`, `cuda` or `cpu` (e.g. `--accelerator cpu --devices 2` runs 2 CPU processes).
        tokenizer_dir: A folder with tokenizer.json (and tokenizer_config.json).
        tokenizer_vocab_size: Without a tokenizer_dir or initial checkpoint: train a byte-level BPE tokenizer
            of this size on the training text (`TextFiles` data) and save it in out_dir/tokenizer.
        logger_name: `csv`, `tensorboard` or `wandb` (WANDB_MODE=offline works without a network).
        seed: Random seed (model init, data order).
        compile: Compile each transformer block with `torch.compile`.
        activation_checkpointing: Recompute each block's activations in the backward pass (saves memory).
    """
    hparams = dict(locals())  # the command's arguments, saved with every checkpoint
    from litllm.train.fabric import make_fabric
    from litllm.train.loggers import check_logger_name
    from litllm.train.optimizer import describe

    hparams["optimizer"] = describe(optimizer)
    check_logger_name(logger_name)
    config = _model_config(model_name, model_config, initial_checkpoint_dir)
    if data is None:
        raise LitLLMError("--data is required, e.g. --data TextFiles --data.train_data_path data/text")
    fabric = make_fabric(devices, num_nodes, strategy, precision, accelerator)
    # clear errors before any process starts or anything is written
    train.gradient_accumulation_iters(fabric.world_size)
    _check_inputs(config, Path(out_dir), resume, initial_checkpoint_dir, tokenizer_dir, tokenizer_vocab_size)
    fabric.launch(
        main, config=config, out_dir=Path(out_dir), initial_checkpoint_dir=initial_checkpoint_dir, resume=resume,
        data=data, train=train, eval=eval, optimizer=optimizer, tokenizer_dir=tokenizer_dir,
        tokenizer_vocab_size=tokenizer_vocab_size, logger_name=logger_name, seed=seed, compile=compile,
        activation_checkpointing=activation_checkpointing, hparams=hparams,
    )


def main(
    fabric,
    config: Config,
    out_dir: Path,
    initial_checkpoint_dir: Optional[Path],
    resume,
    data: DataModule,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer,
    tokenizer_dir: Optional[Path],
    tokenizer_vocab_size: Optional[int],
    logger_name: str,
    seed: int,
    compile: bool,
    activation_checkpointing: bool,
    hparams: dict,
):
    """Runs on every rank after launch: tokenizer, model, then the shared loop."""
    from litllm.model import GPT
    from litllm.tokenizer import Tokenizer
    from litllm.train import checkpoints as ckpt
    from litllm.train.fabric import uses_fsdp
    from litllm.train.loggers import build_logger
    from litllm.train.loop import Method, run

    resume_dir = ckpt.resolve_resume(resume, out_dir, config)  # clear errors before anything is written
    initial_weights = None
    if initial_checkpoint_dir is not None:
        from litllm.utils import check_model_dir

        initial_weights = check_model_dir(initial_checkpoint_dir) / "lit_model.safetensors"
        tokenizer_dir = tokenizer_dir or initial_checkpoint_dir
    if tokenizer_dir is None:
        tokenizer_dir = _trained_tokenizer(fabric, data, out_dir, tokenizer_vocab_size, config)
    tokenizer = Tokenizer(tokenizer_dir)

    fabric.seed_everything(seed)
    with fabric.init_module(empty_init=uses_fsdp(fabric)):
        model = GPT(config)
    if not any(p.is_meta for p in model.parameters()):
        model.reset_parameters()  # on meta (FSDP), materialisation after sharding initialises it

    # a pretrained model continues plain text: say so, unless the tokenizer's folder brings a style
    has_style = (Path(tokenizer_dir) / "prompt_style.yaml").is_file()
    extra_files = {} if has_style else {"prompt_style.yaml": "name: default\n"}
    logger = None
    if fabric.global_rank == 0:
        logger = build_logger(logger_name, out_dir, run_name=out_dir.name, resume=resume_dir is not None)
    result = run(
        fabric, model, Method(name="pretrain"), data, tokenizer, train, eval, optimizer, out_dir, resume_dir or False,
        hparams=hparams, initial_weights=initial_weights, model_files_from=Path(tokenizer_dir),
        extra_files=extra_files, logger=logger, seed=seed, compile=compile,
        activation_checkpointing=activation_checkpointing,
    )
    fabric.print(
        f"Done: {result.step} steps, {result.tokens_seen:,} tokens, final loss "
        f"{result.losses[max(result.losses)]:.4f}" if result.losses else f"Done: {result.step} steps"
    )
    fabric.print(f"Try it: litllm generate {result.final_dir} --prompt \"...\"")
    return result


def _check_inputs(config, out_dir, resume, initial_checkpoint_dir, tokenizer_dir, tokenizer_vocab_size) -> None:
    from litllm.tokenizer import Tokenizer
    from litllm.train.checkpoints import resolve_resume
    from litllm.utils import check_model_dir

    resolve_resume(resume, out_dir, config)
    if initial_checkpoint_dir is not None:
        check_model_dir(initial_checkpoint_dir)
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
        from litllm.utils import atomic_path

        # validated before anything is written: a missing or empty data folder fails here cleanly
        from litllm.data.text_files import list_files

        list_files(source, getattr(data, "glob", "**/*.txt"), getattr(data, "max_files", None))
        with atomic_path(folder) as tmp:
            train_tokenizer(
                data_path=source, out_dir=tmp, vocab_size=vocab_size, glob=getattr(data, "glob", "**/*.txt"),
                max_files=getattr(data, "max_files", None),
            )
    fabric.barrier()
    return folder
