"""`--fast_dev_run`: the check to run on one node before submitting a 48-hour job.

    litllm pretrain --config config_hub/pretrain/tinyllama.yaml --fast_dev_run true   # 4 optimizer steps
    litllm finetune_lora checkpoints/... --data JSON --data.json_path d.json --fast_dev_run 6

The run is the recipe as given (its data, model, strategy, precision, batch sizes) through the same
`setup` and `fit`, with only the budget changed: `n` optimizer steps (`true`: `DEFAULT_STEPS`), a
training checkpoint saved at step n // 2 and resumed from at once (the weights and optimizer state
are overwritten in memory, read back with the code `--resume` uses, and compared with what was
saved), one validation batch at the end, and the `final/` model folder. Everything goes to a
temporary folder that is removed afterwards: the user's out_dir is never written. Because nothing
is validated separately, a broken recipe fails here with the error the real run would give.

The temporary folder must be the same for every process of the run: Fabric's launcher starts the
other local processes with this process's environment (`LITLLM_FAST_DEV_RUN_DIR`), and processes
that torchrun or srun start themselves agree on their common parent's PID. It is a one-node check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from litllm.errors import LitLLMError

DEFAULT_STEPS = 4
"""Optimizer steps of `--fast_dev_run true`."""
ENV_DIR = "LITLLM_FAST_DEV_RUN_DIR"


def dev_run_steps(value: Union[bool, int, None]) -> Optional[int]:
    """`--fast_dev_run` -> optimizer steps of the dev run (None: a normal run)."""
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT_STEPS
    if isinstance(value, int) and value == 0:
        return None
    if not isinstance(value, int) or value < 2:
        raise LitLLMError(
            f"--fast_dev_run: expected true, false or a number of optimizer steps >= 2 (a checkpoint is saved "
            f"halfway and resumed from), got {value!r}"
        )
    return value


def shorten(train, eval, steps: int):
    """(train, eval) of a dev run of `steps` steps: same batches and schedule shape, checkpoint halfway,
    one validation batch after the last step."""
    train = replace(train, max_steps=steps, epochs=None, max_tokens=None, save_interval=steps // 2)
    eval = replace(eval, interval=steps, max_iters=1, initial_validation=False, final_validation=True)
    return train, eval


def _local_rank() -> Optional[int]:
    """This process's rank on its node when torchrun or srun started it (None: started by the user or Fabric)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in os.environ:
            return int(os.environ[name])
    return None


@contextlib.contextmanager
def temporary_out_dir(out_dir: Path) -> Iterator[Path]:
    """A stand-in for `out_dir` under a temporary folder shared by the run's processes; removed afterwards."""
    inherited = os.environ.get(ENV_DIR)
    local_rank = _local_rank()
    if inherited:  # a process Fabric's launcher started: the launching process owns the folder
        folder, owner = Path(inherited), False
    elif local_rank is not None:  # torchrun / srun: the processes of a node share their parent
        folder = Path(tempfile.gettempdir()) / f"litllm-fast-dev-run-{os.getppid()}"
        folder.mkdir(exist_ok=True)
        owner = local_rank == 0
    else:
        folder, owner = Path(tempfile.mkdtemp(prefix="litllm-fast-dev-run-")), True
        os.environ[ENV_DIR] = str(folder)  # Fabric starts the other local processes with this environment
    try:
        yield folder / (Path(out_dir).name or "out")
    finally:
        if owner:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"fast_dev_run: removed the temporary folder {folder}; nothing was written to {out_dir}")
            if not inherited and local_rank is None:
                os.environ.pop(ENV_DIR, None)


@contextlib.contextmanager
def run_folder(run, out_dir: Path) -> Iterator[tuple[Path, Any]]:
    """Around a training command's launch: (the folder the run writes, the `--resume` it resumes with).

    A normal run: `out_dir` and `run.resume`. With `--fast_dev_run`: a temporary stand-in for out_dir
    (removed afterwards; the user's out_dir is never written), where `auto`/`true` find nothing to resume.
    Running out of memory while the run is set up (the model, the data) gives one clear line.
    """
    from litllm.train.fabric import clear_out_of_memory

    # the loop names the step and sizes; this covers building the model and the data before it
    with clear_out_of_memory("while setting up the run"):
        if dev_run_steps(run.fast_dev_run) is None:
            yield Path(out_dir), run.resume
            return
        resume = False if run.resume is True or run.resume == "auto" else run.resume
        with temporary_out_dir(out_dir) as folder:
            yield folder, resume


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (DTensor under FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Every floating-point state tensor of the optimizer, in parameter order."""
    from litllm.train.fabric import unwrap

    opt = unwrap(optimizer)
    tensors = []
    for group in opt.param_groups:
        for param in group["params"]:
            for _, value in sorted(opt.state.get(param, {}).items()):
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    tensors.append(value)
    return tensors


@dataclass
class DevRun:
    """What a `--fast_dev_run` measures and checks along `fit` (on every rank)."""

    steps: int
    user_out_dir: Path
    resume_step: int = 0
    checks: list[str] = field(default_factory=list)
    step_seconds: float = 0.0
    """Wall time of the optimizer steps after the first (compilation and warm-up excluded)."""
    step_tokens: int = 0
    """Input tokens of those steps on this rank."""
    _started: float = 0.0

    def __post_init__(self) -> None:
        self.resume_step = self.steps // 2

    # ---- throughput
    def _sync(self, fabric) -> None:
        if fabric.device.type == "cuda":
            torch.cuda.synchronize(fabric.device)

    def start_step(self, fabric) -> None:
        self._sync(fabric)
        self._started = time.perf_counter()

    def end_step(self, fabric, step: int, micro_batches: list[dict]) -> None:
        if step == 1:
            return
        self._sync(fabric)
        self.step_seconds += time.perf_counter() - self._started
        self.step_tokens += sum(b["input_ids"].numel() for b in micro_batches)

    # ---- the checkpoint round trip
    def round_trip(self, t, path: Path) -> None:
        """Resume from the checkpoint just written at step k, as `--resume <path>` would, and check it
        restored this rank's trained weights and optimizer state exactly (collective)."""
        from litllm.train import checkpoints as ckpt

        trained = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
        saved_params = {n: _local(p).detach().clone() for n, p in trained.items()}
        saved_opt = [_local(s).clone() for s in _optimizer_tensors(t.optimizer)]
        saved_state = dict(t.state)
        with torch.no_grad():  # overwrite what's in memory, so only the files can bring it back
            for p in trained.values():
                _local(p).add_(1.0)
            for s in _optimizer_tensors(t.optimizer):
                _local(s).add_(1.0)
        resume_dir = ckpt.resolve_resume(path, t.out_dir, t.model.config)  # the checks of `--resume <path>`
        ckpt.restore_checkpoint(t.fabric, resume_dir, t.model, t.optimizer, t.method, t.stream, t.state)
        wrong = [n for n, p in trained.items() if not torch.equal(_local(p), saved_params[n])]
        restored_opt = [_local(s) for s in _optimizer_tensors(t.optimizer)]
        if len(restored_opt) != len(saved_opt) or not all(map(torch.equal, restored_opt, saved_opt)):
            wrong.append("the optimizer state")
        if t.state != saved_state:
            wrong.append(f"the counters ({t.state} instead of {saved_state})")
        if wrong:
            raise LitLLMError(f"--fast_dev_run: resuming from {path} did not restore {', '.join(wrong[:3])}")
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if t.fabric.global_rank == 0 else 0
        self.checks.append(
            f"checkpoint: saved {Path(path).name} ({size / 2**20:.1f} MiB), resumed from it (weights, optimizer "
            f"state and counters restored exactly, data position reloaded), continued to step {self.steps}"
        )

    # ---- the summary
    def report(self, t, result) -> None:
        """Print what was checked, tokens/s and peak memory per device (collective)."""
        fabric, train = t.fabric, t.train
        device = fabric.device
        if device.type == "cuda":
            peak, how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            how = "CPU: peak RSS of each process"
        gathered = fabric.all_gather(torch.tensor([float(peak), self.step_seconds, float(self.step_tokens)],
                                                  dtype=torch.float64, device=device))
        rows = gathered.reshape(-1, 3).tolist()
        seconds = max(r[1] for r in rows)
        tokens = sum(r[2] for r in rows)
        losses = [v for _, v in sorted(result.losses.items()) if v is not None]
        global_batch = t.accumulation * train.micro_batch_size * fabric.world_size
        lines = [
            f"batch: {global_batch} samples per step = {t.accumulation} accumulation x {train.micro_batch_size} "
            f"micro-batch x {fabric.world_size} device(s) ({type(fabric.strategy).__name__}, "
            f"{getattr(fabric.strategy.precision, 'precision', '?')}), up to {t.seq_length} tokens per sample",
            f"training: {result.step} optimizer steps on the recipe's data"
            + (f", loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""),
            *self.checks,
            (f"validation: 1 batch per device, loss {result.val_loss:.4f}" if t.val_loader is not None
             else "validation: the data module has no validation set (skipped)"),
            "final model folder: written and complete",
            (f"throughput: {tokens / seconds:,.0f} tokens/s (steps 2-{result.step}, all devices)" if seconds > 0
             else "throughput: not measured (one step only)"),
            f"peak memory per device ({how}): "
            + ", ".join(f"rank {i} {r[0] / 2**30:.2f} GiB" for i, r in enumerate(rows)),
        ]
        fabric.print(f"fast_dev_run passed, {self.user_out_dir} untouched (outputs in a temporary folder, removed):")
        for line in lines:
            fabric.print(f"  {line}")
