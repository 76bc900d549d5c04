"""Metric loggers: `--logger_name csv | tensorboard | wandb` (the last two imported lazily).

Each logger has Fabric's logger interface: `log_metrics(metrics, step)`, `log_hyperparams(params)` and
`finalize(status)`; only global rank 0 creates one. Logs live in `out_dir/logs/<name>/`; a resumed run
continues them.

- tensorboard: Lightning's own `lightning.fabric.loggers.TensorBoardLogger`.
- csv: ours, because Fabric's `CSVLogger` (2.6) cannot continue a resumed run's log: reusing its
  folder deletes the existing metrics.csv (a new version_N folder splits the history instead); it
  keeps up to 100 rows in memory (a killed run loses rows its resume does not replay: those before the
  checkpoint); it writes a step's val_loss as a second row; and it refuses `log_hyperparams`.
- wandb: ours, a few lines over `wandb.init` / `run.log`: wandb's Fabric `WandbLogger` warns that it is
  tested only with Fabric 2.1.3, and its `finalize` leaves the run unfinished.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from pathlib import Path
from typing import Any, Optional

from litllm.errors import LitLLMError

LOGGERS = ("csv", "tensorboard", "wandb")


class CSVLogger:
    """`metrics.csv`: one row per logged step, one column per metric, written as it comes.

    A step's row is appended (and flushed) when logged, so the cost of a step does not grow with the
    rows before it. A later metric of the step just written (e.g. its val_loss) rewrites that one row.
    Only two things rewrite the file: a metric never seen before (a new column changes the header: once
    per column) and a run's first row: a resumed run drops the rows of the steps it replays, a fresh one
    starts over.
    """

    def __init__(self, log_dir: Path, resume: Optional[bool] = None) -> None:
        self.path = Path(log_dir) / "metrics.csv"  # nothing is written before the first metrics
        self.resume = resume  # None: a first step > 1 means a resumed run
        self.columns: Optional[list[str]] = None  # None until the first row: the file isn't read before
        self._last: dict[str, Any] = {}  # the last row written, and the byte offset where it starts
        self._last_offset: Optional[int] = None

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "hparams.json").write_text(json.dumps(params, indent=2, default=str))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **metrics}
        if self.columns is None:
            self._start(step, metrics)
        if self._last and int(self._last["step"]) == step:
            row = {**self._last, **row}  # e.g. val_loss of the step just logged: rewrite that row
        else:
            self._last, self._last_offset = {}, None
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite(read_csv_rows(self.path)[: None if self._last_offset is None else -1] + [row])
        else:
            self._write_last(row)

    def _start(self, first_step: int, metrics: dict[str, Any]) -> None:
        """Keep the history before `first_step` (a resumed run); start over for a fresh run. First metrics
        without a training loss (a run resumed at its last step only validates) keep that step's row and
        join it, so a kill while `final/` was written costs the last row nothing."""
        resumed = self.resume if self.resume is not None else first_step > 1
        keep = first_step + 1 if "loss" not in metrics else first_step
        rows = [r for r in read_csv_rows(self.path) if int(r["step"]) < keep] if resumed else []
        self.columns = ["step"]
        for r in rows:
            self.columns += [k for k in r if k not in self.columns]
        self._rewrite(rows)
        if not (self._last and int(self._last["step"]) == first_step):
            self._last, self._last_offset = {}, None

    def _line(self, row: dict[str, Any]) -> str:
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=self.columns).writerow(row)
        return buffer.getvalue()

    def _write_last(self, row: dict[str, Any]) -> None:
        from litllm.utils import write_error

        data = self._line(row).encode("utf-8")
        with open(self.path, "r+b", buffering=0) as f:  # unbuffered: a failed write fails here, not at close
            offset = f.seek(0, os.SEEK_END) if self._last_offset is None else self._last_offset
            f.seek(offset)
            f.truncate()
            try:
                if f.write(data) != len(data):  # a short write: the device is full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as e:  # no half row is left behind
                f.truncate(offset)
                raise write_error(self.path, e) or e from None
        self._last, self._last_offset = row, offset

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        from litllm.utils import atomic_path

        with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(self.columns)
            for r in rows[:-1]:
                f.write(self._line(r))
            offset = f.tell()
            if rows:
                f.write(self._line(rows[-1]))
        self._last, self._last_offset = (rows[-1], offset) if rows else ({}, None)

    def finalize(self, status: str = "success") -> None:
        pass


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv ([] when absent); a last line cut short by a crash is dropped."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [{k: v for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(io.StringIO(text, newline=""))]


def tensorboard_logger(log_dir: Path):
    """Lightning's TensorBoard logger writing event files into `log_dir` itself (created at the first metrics)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise LitLLMError("--logger_name tensorboard needs the tensorboard package: pip install tensorboard") from None
    from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger

    # version "" puts the events in log_dir itself, the same folder on every resume (no version_N split)
    return FabricTensorBoardLogger(root_dir=Path(log_dir).parent, name=Path(log_dir).name, version="",
                                   default_hp_metric=False)


class WandbLogger:
    """Weights & Biases; `WANDB_MODE=offline` logs without a network (sync later with `wandb sync`).

    The run starts at the first metrics; a resumed training run continues the same W&B run.
    """

    def __init__(self, log_dir: Path, name: str, resume: bool) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise LitLLMError("--logger_name wandb needs the wandb package: pip install wandb") from None
        self.log_dir, self.name, self.resume = log_dir, name, resume
        self._run = None
        self._pending_config: dict[str, Any] = {}

    @property
    def run(self):
        if self._run is None:
            import wandb

            self.log_dir.mkdir(parents=True, exist_ok=True)
            id_file = self.log_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if self.resume and id_file.is_file() else None
            self._run = wandb.init(
                project="litllm", name=self.name, dir=str(self.log_dir), id=run_id,
                resume="allow" if run_id else None, config=self._pending_config,
            )
            id_file.write_text(self._run.id)
        return self._run

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self._pending_config.update(params)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def finalize(self, status: str = "success") -> None:
        if self._run is not None:
            self._run.finish()


def check_logger_name(name: str) -> None:
    if name not in LOGGERS:
        raise LitLLMError(f"--logger_name: expected one of {', '.join(LOGGERS)}, got {name!r}")


def build_logger(name: str, out_dir: Path, run_name: str, resume: bool = False):
    """The logger for global rank 0 (call only there). Logs go to `out_dir/logs/<name>/`."""
    check_logger_name(name)
    log_dir = Path(out_dir) / "logs" / name
    if name == "csv":
        return CSVLogger(log_dir, resume=resume)
    if name == "tensorboard":
        return tensorboard_logger(log_dir)
    return WandbLogger(log_dir, run_name, resume=resume)


def loss_history(logger, losses: dict[int, float], val_losses: dict[int, float]) -> dict[str, list[tuple[int, float]]]:
    """Loss series for the plot: the CSV log's full history when there is one (it spans resumes)."""
    if isinstance(logger, CSVLogger):
        series: dict[str, list[tuple[int, float]]] = {"loss": [], "val_loss": []}
        for row in read_csv_rows(logger.path):
            for key in series:
                if key in row:
                    series[key].append((int(row["step"]), float(row[key])))
        return series
    return {"loss": sorted(losses.items()), "val_loss": sorted(val_losses.items())}


def plot_loss_curve(series: dict[str, list[tuple[int, float]]], out_png: Path) -> Optional[Path]:
    """Training and validation loss against step, as a PNG; None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = series.get(key) or []
        if points:
            few = key == "val_loss" or len(points) < 20  # short runs: mark the points so they show
            ax.plot(*zip(*points), label=label, marker="o" if few else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
