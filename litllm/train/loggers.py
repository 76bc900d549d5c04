"""Metric loggers: `--logger_name csv | tensorboard | wandb` (the last two imported lazily).

Each logger has `log_metrics(metrics, step)`, `log_hyperparams(params)` and `finalize()`; only
global rank 0 creates one. Logs live in `out_dir/logs/`; a resumed run appends to them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

from litllm.errors import LitLLMError

LOGGERS = ("csv", "tensorboard", "wandb")


class CSVLogger:
    """`metrics.csv`: one row per logged step, one column per metric (columns grow as metrics appear)."""

    def __init__(self, log_dir: Path) -> None:
        self.path = Path(log_dir) / "metrics.csv"  # nothing is written before the first metrics
        self.rows: Optional[list[dict[str, Any]]] = None

    def _load(self, first_step: int) -> list[dict[str, Any]]:
        # a resumed run keeps the history before its first step; a fresh run (step 1) starts over
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return [r for r in csv.DictReader(f) if int(r["step"]) < first_step]

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "hparams.json").write_text(json.dumps(params, indent=2, default=str))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **metrics}
        if self.rows is None:
            self.rows = self._load(step)
        if self.rows and int(self.rows[-1]["step"]) == step:
            self.rows[-1].update(row)  # e.g. val_loss of the step just logged
        else:
            self.rows.append(row)
        self._write()

    def _write(self) -> None:
        columns: list[str] = []
        for row in self.rows or []:
            columns += [k for k in row if k not in columns]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns or ["step"])
            writer.writeheader()
            writer.writerows(self.rows or [])
        tmp.replace(self.path)

    def finalize(self) -> None:
        pass


class TensorBoardLogger:
    """TensorBoard event files (`tensorboard --logdir out_dir/logs`); created at the first metrics."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise LitLLMError("--logger_name tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.log_dir = log_dir
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self.writer.add_text("hyperparameters", "```\n" + json.dumps(params, indent=2, default=str) + "\n```")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def finalize(self) -> None:
        if self._writer is not None:
            self._writer.close()


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

    def finalize(self) -> None:
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
        return CSVLogger(log_dir)
    if name == "tensorboard":
        return TensorBoardLogger(log_dir)
    return WandbLogger(log_dir, run_name, resume=resume)


def loss_history(logger, losses: dict[int, float], val_losses: dict[int, float]) -> dict[str, list[tuple[int, float]]]:
    """Loss series for the plot: the CSV log's full history when there is one (it spans resumes)."""
    if isinstance(logger, CSVLogger):
        series: dict[str, list[tuple[int, float]]] = {"loss": [], "val_loss": []}
        for row in logger.rows or []:
            for key in series:
                if row.get(key) not in (None, ""):
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
