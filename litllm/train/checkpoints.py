"""Training checkpoints: save, find, resume, and turn into model folders.

A training checkpoint `out_dir/step-XXXXXXXX/` holds:
  lit_model.safetensors    the model (when every parameter trains), or
  trainable.safetensors    only the trained parameters (LoRA, adapters: the frozen base is re-read)
  optimizer.pt             the optimizer state, keyed by parameter name (any device count can resume it)
  training_state.pt        step/token/epoch counters, RNG states, the data loader's position
  model_config.yaml, hyperparameters.yaml, tokenizer files
With every parameter trained, the folder is also a model folder (generate, finetune, convert take it).
With `--train.state_dict_type sharded` under FSDP, the weights and optimizer state are instead a
`torch.distributed.checkpoint` folder `sharded/` (see `litllm.train.sharded_checkpoint`), which any
device count resumes; `convert_pretrained_checkpoint` joins it into a model folder.

Saving is atomic: the folder is written under a hidden temporary name and renamed when complete,
so a crash (even SIGKILL) mid-save never leaves a checkpoint that looks complete. Full state dicts
are gathered to global rank 0 (`torch.distributed.checkpoint.state_dict`, which handles single
device, DDP and FSDP2 alike), which alone writes. Files are read back through `litllm.model_folder`
(safetensors or `torch.load(weights_only=True)`; a damaged file is one clear error naming it), and
`--resume auto` passes over a damaged newest checkpoint, with a warning, to the newest intact one.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from litllm.config import Config
from litllm.errors import LitLLMError
from litllm.model_folder import (
    CONFIG_FILE, TRAINABLE_WEIGHTS, WEIGHTS_FILE, check_safetensors, check_torch_file, copy_model_files,
    read_safetensors, read_torch_file, stored_state_dict,
)
from litllm.hparams import hyperparameters, to_plain, write_hyperparameters  # noqa: F401  (to_plain: re-exported)
from litllm.utils import atomic_path, check_output_dir, clean_stale_temporaries

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "training_state.pt"
FORMAT_VERSION = 1
# Config fields that don't change the model's computation (a checkpoint may differ in them)
_COSMETIC_FIELDS = {"name", "hf_repo"}


# ---------------------------------------------------------------------- finding checkpoints
def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_dirs(out_dir: Path) -> list[Path]:
    """Complete training checkpoints in `out_dir`, newest first (temporaries are hidden)."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True) if (p / STATE_FILE).is_file()]


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The complete training checkpoint with the highest step in `out_dir`."""
    found = _step_dirs(out_dir)
    return found[0] if found else None


def diverged_message(what: str, out_dir: Optional[Path]) -> str:
    """The one line a diverged run stops with: what happened, and where to resume from."""
    last = latest_checkpoint(Path(out_dir)) if out_dir is not None else None
    where = (f"the last good checkpoint is {last}: resume it with `--resume {last}` and a lower --optimizer.lr "
             "(or a smaller --train.max_norm)" if last is not None else
             "no checkpoint was saved before; start again with a lower --optimizer.lr")
    return f"training diverged: {what}; nothing was saved from this state, {where}"


def check_training_checkpoint(path: Path) -> None:
    """Fail clearly unless every file of a training checkpoint is there and complete (reads headers only)."""
    from litllm.train import sharded_checkpoint

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise LitLLMError(f"{path}: not a training checkpoint (no {STATE_FILE}); expected out_dir/step-XXXXXXXX")
    check_torch_file(path / STATE_FILE)
    Config.from_file(path / CONFIG_FILE)
    if sharded_checkpoint.is_sharded(path):
        sharded_checkpoint.saved_key(path)
        return
    weights = next((path / n for n in (WEIGHTS_FILE, TRAINABLE_WEIGHTS) if (path / n).is_file()), None)
    if weights is None:
        raise LitLLMError(f"{path}: no {WEIGHTS_FILE} or {TRAINABLE_WEIGHTS}")
    check_safetensors(weights)
    check_torch_file(path / "optimizer.pt")


def resolve_resume(resume: Union[bool, str, Path], out_dir: Path, config: Config) -> Optional[Path]:
    """The checkpoint to resume from (None: start fresh), checked against `config` before any write.

    A command resolves it once, before launch, and hands the result to `litllm.train.loop.setup`.

    `auto` takes the newest checkpoint whose files are intact, warning about each damaged one it skips.
    """
    if resume is False or resume is None or resume == "false":
        return None
    if resume is True or resume == "auto":
        path = None
        for candidate in _step_dirs(Path(out_dir)):
            try:
                check_training_checkpoint(candidate)
            except LitLLMError as e:
                print(f"warning: --resume auto skips a damaged checkpoint: {e}", file=sys.stderr)
                continue
            path = candidate
            break
        if path is None:
            return None
    else:
        path = Path(resume)
        if not path.exists():  # a mistyped step number: say so, not that the folder lacks a file
            saved = _step_dirs(path.parent)
            steps = ", ".join([p.name for p in saved[:3]] + (["..."] if len(saved) > 3 else []))
            raise LitLLMError(f"--resume {path}: not found" + (f" ({path.parent} holds {steps})" if saved else ""))
        if not (path / STATE_FILE).is_file():
            raise LitLLMError(f"--resume {path}: not a training checkpoint (no {STATE_FILE}); expected out_dir/step-XXXXXXXX")
        try:
            check_training_checkpoint(path)
        except LitLLMError as e:
            raise LitLLMError(f"--resume {path}: {e}") from None
    saved = Config.from_file(path / CONFIG_FILE).to_dict()
    current = config.to_dict()
    differing = sorted(k for k in current if k not in _COSMETIC_FIELDS and saved.get(k) != current[k])
    if differing:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {current[k]!r}" for k in differing[:4])
        raise LitLLMError(f"--resume {path}: the checkpoint is of another model shape ({details})")
    return path


# ---------------------------------------------------------------------- RNG
def get_rng_state() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------- saving
def _trainable_names(module: nn.Module) -> set[str]:
    from litllm.train.fabric import clean_name

    return {clean_name(n) for n, p in module.named_parameters() if p.requires_grad}


def _full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict on global rank 0 (CPU), empty elsewhere; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from litllm.model_folder import has_tied_head

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return stored_state_dict(sd, has_tied_head(module))


class CheckpointWriter:
    """Writes `step-XXXXXXXX/` training checkpoints and the `final/` model folder of one run."""

    def __init__(
        self,
        fabric,
        out_dir: Path,
        model: nn.Module,
        config: Config,
        method,
        tokenizer_dir: Optional[Path],
        job: Any,
        extra_files: dict[str, str],
        state_dict_type: str = "full",
    ) -> None:
        from litllm.train.fabric import unwrap, uses_fsdp

        self.fabric = fabric
        self.out_dir = Path(out_dir)
        self.module = unwrap(model)
        self.config = config
        self.method = method
        self.tokenizer_dir = tokenizer_dir
        self.hparams = hyperparameters(job)
        """The command's job as its flat flags: what every checkpoint's hyperparameters.yaml records."""
        self.extra_files = extra_files
        self.trainable = _trainable_names(self.module)
        all_params = {n for n in _all_param_names(self.module)}
        self.trains_everything = self.trainable >= all_params
        # only FSDP has shards to keep apart; one device and DDP hold every weight whole anyway
        self.sharded = state_dict_type == "sharded" and fabric.world_size > 1 and uses_fsdp(fabric)
        self.logger_run: Optional[dict[str, Any]] = None
        """The logger's run ({logger, id, ...}: `TrainingLogger.run_record`), saved in the training state."""
        if fabric.global_rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.out_dir.glob(".step-*.tmp-*"):  # left behind by a killed save
                shutil.rmtree(stale, ignore_errors=True)
            clean_stale_temporaries(self.out_dir / "final")  # a killed write of final/ (the swap's old one too)

    def check_finite(self, when: str) -> None:
        """Refuse to save a NaN/inf weight (collective): one error line pointing at the last good checkpoint."""
        trained = [p.to_local() if hasattr(p, "to_local") else p for p in self.module.parameters() if p.requires_grad]
        if not trained:
            return
        bad = torch.stack([~torch.isfinite(p).all() for p in trained]).sum().double()
        if self.fabric.all_reduce(bad, reduce_op="sum").item():
            raise LitLLMError(diverged_message(f"the weights hold NaN/inf values at {when}", self.out_dir))

    def _write_model_files(self, folder: Path) -> None:
        self.config.save(folder / CONFIG_FILE)
        copy_model_files(folder, self.tokenizer_dir)
        for name, text in self.extra_files.items():
            (folder / name).write_text(text, encoding="utf-8")
        write_hyperparameters(folder, self.hparams)

    def save_step(self, optimizer, counters: dict[str, Any], data_state: dict[str, Any]) -> Path:
        """Save a resumable checkpoint for the current step (collective: call on every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from litllm.model_folder import save_model_weights  # looked up per call (tests slow it down)
        from litllm.train.fabric import unwrap

        self.check_finite(f"step {counters['step']}")
        if self.sharded:
            return self._save_sharded_step(optimizer, counters, data_state)
        sd = _full_model_state(self.module)
        if not self.trains_everything:
            sd = {k: v for k, v in sd.items() if k in self.trainable}
        opt_sd = get_optimizer_state_dict(
            self.module, unwrap(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        path = self.out_dir / step_dir_name(counters["step"])
        if self.fabric.global_rank == 0:
            state = self._training_state(counters, data_state)
            with atomic_path(path) as tmp:
                tmp.mkdir()
                weights = WEIGHTS_FILE if self.trains_everything else TRAINABLE_WEIGHTS
                save_model_weights(sd, tmp / weights)
                torch.save(opt_sd, tmp / "optimizer.pt")
                self._write_model_files(tmp)
                torch.save(state, tmp / STATE_FILE)  # written last: its presence marks a complete folder
        self.fabric.barrier()
        return path

    def _training_state(self, counters: dict[str, Any], data_state: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "counters": dict(counters),
            "data": data_state,
            "rng": get_rng_state(),
            "world_size": self.fabric.world_size,
            **({"logger_run": self.logger_run} if self.logger_run else {}),  # the W&B/MLflow run a resume continues
        }

    def _save_sharded_step(self, optimizer, counters: dict[str, Any], data_state: dict[str, Any]) -> Path:
        """Every rank writes its shards (DCP) into rank 0's temporary folder; rank 0 renames it when all are done."""
        import contextlib

        from litllm.train import sharded_checkpoint
        from litllm.train.fabric import unwrap

        path = self.out_dir / step_dir_name(counters["step"])
        rank0 = self.fabric.global_rank == 0
        names = None if self.trains_everything else self.trainable
        with atomic_path(path) if rank0 else contextlib.nullcontext() as tmp:
            if rank0:
                tmp.mkdir()
            tmp = Path(self.fabric.broadcast(str(tmp) if rank0 else None, src=0))
            sharded_checkpoint.save(tmp, self.module, unwrap(optimizer), names, self.fabric.global_rank)
            self.fabric.barrier()  # every shard is on disk
            if rank0:
                self._write_model_files(tmp)
                torch.save(self._training_state(counters, data_state), tmp / STATE_FILE)  # last: marks it complete
        self.fabric.barrier()
        return path

    def save_final(self) -> Path:
        """Write `final/`: a model folder with the method's exported weights (collective)."""
        from litllm.model_folder import save_model_weights

        self.check_finite("the end of training")
        sd = _full_model_state(self.module)
        path = self.out_dir / "final"
        if self.fabric.global_rank == 0:
            exported = self.method.export(sd)
            with atomic_path(path) as tmp:  # every file is written before final/ appears
                tmp.mkdir()
                save_model_weights(exported, tmp / WEIGHTS_FILE)
                self.method.write_outputs(tmp, sd)
                self._write_model_files(tmp)
        self.fabric.barrier()
        return path


def _all_param_names(module: nn.Module) -> set[str]:
    from litllm.train.fabric import clean_name

    return {clean_name(n) for n, _ in module.named_parameters()}


# ---------------------------------------------------------------------- loading
def load_training_checkpoint(fabric, path: Path, model: nn.Module, optimizer, method) -> dict[str, Any]:
    """Restore model and optimizer from `path` (every rank reads it); returns counters, data and RNG state."""
    from litllm.model_folder import load_full_state_dict
    from litllm.train import sharded_checkpoint
    from litllm.train.fabric import unwrap

    module = unwrap(model)
    trainable = _trainable_names(module)
    trains_everything = trainable >= _all_param_names(module)
    if sharded_checkpoint.is_sharded(path):  # DCP reshards onto this run's layout, whatever its device count
        sharded_checkpoint.load(path, module, unwrap(optimizer), None if trains_everything else trainable)
        return _read_training_state(path)
    if (path / "sharded_index.json").is_file():
        raise LitLLMError(
            f"{path}: a sharded checkpoint in the per-rank format of earlier litllm versions, which this one no "
            "longer reads; resume it with the litllm that wrote it, or start from its final/ folder"
        )
    if (path / WEIGHTS_FILE).is_file():
        load_full_state_dict(module, read_safetensors(path / WEIGHTS_FILE), source=path)
    elif (path / TRAINABLE_WEIGHTS).is_file():
        sd = read_safetensors(path / TRAINABLE_WEIGHTS)
        load_full_state_dict(module, sd, required=trainable, source=path)
    else:
        raise LitLLMError(f"{path}: no {WEIGHTS_FILE} or {TRAINABLE_WEIGHTS}")
    opt_sd = read_torch_file(path / "optimizer.pt")
    _set_full_optimizer_state(module, optimizer, opt_sd, path / "optimizer.pt")
    return _read_training_state(path)


def restore_checkpoint(fabric, resume_dir: Path, model, optimizer, method, stream, state: dict) -> dict[str, Any]:
    """Load a training checkpoint into the set-up model and optimizer, and restore the counters (`state`,
    in place), the data position (`stream`: the loop's `BatchStream`) and the RNG states: what `--resume`
    does (and `--fast_dev_run` checks). Returns the checkpoint's training state (e.g. its `logger_run`)."""
    _check_same_method(resume_dir, method.name)
    restored = load_training_checkpoint(fabric, resume_dir, model, optimizer, method)
    state.update(restored["counters"])
    saved_world = restored.get("world_size", fabric.world_size)
    if saved_world == fabric.world_size:
        stream.load_state_dict(restored["data"], state)
    else:  # weights and optimizer reshard freely; a data position is per rank layout
        stream.epoch = state["epoch"]
        fabric.print(
            f"Warning: {resume_dir} was saved by {saved_world} processes, this run has {fabric.world_size}: the "
            f"data order restarts at the beginning of epoch {state['epoch']} (some samples repeat)"
        )
    set_rng_state(restored["rng"])
    fabric.print(f"Resuming from {resume_dir} at step {state['step']}")
    return restored


def _check_same_method(resume_dir: Path, method: str) -> None:
    """A checkpoint resumes the method that wrote it (its provenance.yaml names it): another command's model has
    other trainable weights, which would fail to load with a list of missing and unexpected names."""
    import yaml

    from litllm.train.provenance import PROVENANCE_FILE

    path = Path(resume_dir) / PROVENANCE_FILE
    saved = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("method") if path.is_file() else None
    if saved is not None and saved != method:
        raise LitLLMError(f"--resume {resume_dir}: a checkpoint of a {saved} run, and this run trains {method}: "
                          "resume it with the command that wrote it, or start this one in another --out_dir")


def _set_full_optimizer_state(module: nn.Module, optimizer, opt_sd: dict, source: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from litllm.train.fabric import unwrap

    if not opt_sd.get("state"):  # a stateless optimizer (SGD without momentum): torch's loader finds no tensor to
        # place and fails, and there is nothing but the groups' hyper-parameters to restore
        for group, saved in zip(unwrap(optimizer).param_groups, opt_sd.get("param_groups", [])):
            group.update({key: value for key, value in saved.items() if key != "params"})
        return
    try:
        set_optimizer_state_dict(
            module, unwrap(optimizer), opt_sd, options=StateDictOptions(full_state_dict=True)
        )
    except (KeyError, ValueError, RuntimeError) as e:
        raise LitLLMError(f"{source}: does not match this run's optimizer/parameters ({e})") from None


def _read_training_state(path: Path) -> dict[str, Any]:
    state = read_torch_file(path / STATE_FILE)
    if state.get("format") != FORMAT_VERSION:
        raise LitLLMError(f"{path / STATE_FILE}: unknown checkpoint format {state.get('format')!r}")
    return state


# ---------------------------------------------------------------------- command
def convert_pretrained_checkpoint(checkpoint_dir: Path, output_dir: Path) -> None:
    """Turn a training checkpoint (`out_dir/step-XXXXXXXX` or `final`) into a model folder.

    The model folder (`lit_model.safetensors`, `model_config.yaml`, tokenizer files) is what
    `litllm generate`, `litllm finetune_*` and `litllm convert_from_litllm` take. Optimizer and
    training state are left out.

    Args:
        checkpoint_dir: the training checkpoint folder.
        output_dir: where to write the model folder (must not exist yet, or be empty).
    """
    from litllm.train import sharded_checkpoint

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if not checkpoint_dir.is_dir():
        raise LitLLMError(f"{checkpoint_dir}: checkpoint folder not found")
    weights = checkpoint_dir / WEIGHTS_FILE
    sharded = sharded_checkpoint.is_sharded(checkpoint_dir)
    if not weights.is_file():
        if (checkpoint_dir / TRAINABLE_WEIGHTS).is_file() or (sharded and sharded_checkpoint.saved_key(checkpoint_dir) != "model"):
            raise LitLLMError(
                f"{checkpoint_dir}: holds only the trained parameters of a finetuning method "
                f"({TRAINABLE_WEIGHTS if not sharded else sharded_checkpoint.SHARDED_DIR + '/'}); "
                f"use the run's final/ folder, which has the merged model, or for a LoRA run's step "
                f"`litllm merge_lora {checkpoint_dir} --out_dir {output_dir}`"
            )
        if not sharded:
            raise LitLLMError(f"{checkpoint_dir}: no {WEIGHTS_FILE} (is this a litllm training checkpoint?)")
    else:
        check_safetensors(weights)
    if not (checkpoint_dir / CONFIG_FILE).is_file():
        raise LitLLMError(f"{checkpoint_dir}: no {CONFIG_FILE}")
    check_output_dir(output_dir, "output_dir")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise LitLLMError(f"{output_dir}: exists and is not empty; choose a new output folder")
    Config.from_file(checkpoint_dir / CONFIG_FILE)  # fails clearly if unreadable
    from litllm.model_folder import save_model_weights

    full = sharded_checkpoint.full_weights(checkpoint_dir) if sharded and not weights.is_file() else None
    with atomic_path(output_dir) as tmp:
        tmp.mkdir()
        if full is not None:  # a sharded step: DCP joins the shards
            save_model_weights(full, tmp / WEIGHTS_FILE)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if (checkpoint_dir / name).is_file():
                shutil.copy2(checkpoint_dir / name, tmp / name)
        copy_model_files(tmp, checkpoint_dir)
    print(f"Wrote the model folder {output_dir}")
