"""Metric loggers: `--logger_name csv | tensorboard | wandb | mlflow` (the last three imported lazily).

The loop logs through a `TrainingLogger` (global rank 0 only): `out_dir/logs/csv/metrics.csv` always (the
history the loss-curve PNG is drawn from, whatever the tracker), plus the tracker `--logger_name` names,
whose run is named by `--logger.*` (`LoggerArgs`) and kept across resumes: its id is saved in each
checkpoint's training state and a resumed job logs into the same W&B / MLflow run. Every logger has Fabric's
logger interface: `log_metrics(metrics, step)`, `log_hyperparams(params)` and `finalize(status)`.

- tensorboard: Lightning's own `lightning_fabric.loggers.TensorBoardLogger`.
- mlflow: ours over `MlflowClient` (works with `mlflow-skinny`), logging as Lightning's `MLFlowLogger` does,
  honouring MLFLOW_TRACKING_URI; without it, a file store in `out_dir/logs/mlflow`.
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
import re
import time
from pathlib import Path
from typing import Any, Optional

from litllm.errors import LitLLMError

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")


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
    from lightning_fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger

    # version "" puts the events in log_dir itself, the same folder on every resume (no version_N split)
    return FabricTensorBoardLogger(root_dir=Path(log_dir).parent, name=Path(log_dir).name, version="",
                                   default_hp_metric=False)


class WandbLogger:
    """Weights & Biases; `WANDB_MODE=offline` logs without a network (sync later with `wandb sync`).

    The run id is chosen here (or is a resumed job's), so a checkpoint saved before the first metrics keeps it;
    the run itself starts at the first metrics.
    """

    def __init__(self, log_dir: Path, naming: dict[str, Any], run_id: Optional[str] = None) -> None:
        import secrets
        import string

        self.log_dir, self.naming = Path(log_dir), naming
        # a new id as wandb makes them (8 of [a-z0-9]), chosen here so that the first checkpoint keeps it
        self.run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self._run = None
        self._pending_config: dict[str, Any] = {}

    @property
    def run(self):
        if self._run is None:
            import wandb

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=self.naming["project"], name=self.naming["run_name"], group=self.naming["group"],
                tags=self.naming["tags"] or None, dir=str(self.log_dir), id=self.run_id, resume="allow",
                config=self._pending_config, allow_val_change=True,  # a resumed job may change a flag (e.g. --resume)
            )
        return self._run

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self._pending_config.update(params)
        if self._run is not None:
            self._run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def finalize(self, status: str = "success") -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if status == "success" else 1)


class MLflowLogger:
    """An MLflow run, created (or reopened) at once so that checkpoints keep its id, logged as Lightning's
    `MLFlowLogger` logs (that class lives in `lightning.pytorch`, whose import pulls torchmetrics: see
    litllm/train/fabric.py): in the experiment `--logger.project` (created when absent), named
    `--logger.run_name`, tagged with the group, `--logger.tags` and MLflow's context tags (user, source, git
    commit); hyperparameters flattened with `/`, each value as text cut at 250 characters.

    A resumed run logs the parameters it has not logged yet (MLflow refuses to change one); the whole record
    (recipe and provenance) is also its artifact `litllm_run.yaml`, rewritten by each resume.
    """

    def __init__(self, log_dir: Path, naming: dict[str, Any], run_id: Optional[str] = None) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        uri = os.environ.get("MLFLOW_TRACKING_URI") or Path(log_dir).resolve().as_uri()
        if uri.startswith("file:"):  # mlflow >= 3.7 keeps its file store only on request (a server needs none)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        if run_id is not None:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException:
                print(f"warning: MLflow run {run_id} of the resumed checkpoint is not in {uri}: starting a new run")
                run_id = None
        self.resumed = run_id is not None
        if run_id is None:
            experiment = self.client.get_experiment_by_name(naming["project"])
            if experiment is not None and experiment.lifecycle_stage != "deleted":
                experiment_id = experiment.experiment_id
            else:
                experiment_id = self.client.create_experiment(naming["project"])
            tags = {"group": naming["group"], **mlflow_tags(naming["tags"])}
            if naming["run_name"] is not None:
                tags[MLFLOW_RUN_NAME] = naming["run_name"]
            run_id = self.client.create_run(experiment_id, tags=resolve_tags(tags)).info.run_id
        self.run_id = run_id
        self.tracking_uri = uri

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        import yaml
        from lightning_fabric.utilities.logger import _flatten_dict
        from mlflow.entities import Param

        from litllm.hparams import to_plain

        self.client.log_text(self.run_id, yaml.safe_dump(to_plain(params), sort_keys=False), "litllm_run.yaml")
        params = _flatten_dict(params)
        if self.resumed:
            logged = self.client.get_run(self.run_id).data.params
            params = {k: v for k, v in params.items() if k not in logged}
        batch = [Param(key=k, value=str(v)[:250]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=batch[i: i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        # MLflow allows only these characters in a metric name besides letters and digits
        batch = [Metric(key=re.sub(r"[^a-zA-Z0-9_/. -]+", "", k), value=v, timestamp=now_ms, step=step)
                 for k, v in metrics.items() if not isinstance(v, str)]
        self.client.log_batch(self.run_id, metrics=batch)

    def finalize(self, status: str = "success") -> None:
        self.client.set_terminated(self.run_id, "FAILED" if status == "failed" else "FINISHED")


def mlflow_tags(tags: list[str]) -> dict[str, str]:
    """`--logger.tags` as MLflow tags: `key=value`, or a bare label set to `true`."""
    return dict(tag.split("=", 1) if "=" in tag else (tag, "true") for tag in tags)


def check_logger_name(name: str) -> None:
    if name not in LOGGERS:
        raise LitLLMError(f"--logger_name: expected one of {', '.join(LOGGERS)}, got {name!r}")
    package = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}.get(name)
    if package is not None:
        import importlib.util

        if importlib.util.find_spec(package) is None:
            extra = "mlflow-skinny" if name == "mlflow" else package
            raise LitLLMError(f"--logger_name {name} needs the {package} package: pip install {extra} "
                              "(or the litllm[loggers] extra)")
    if name == "wandb":
        check_wandb_credentials()


def check_wandb_credentials() -> None:
    """W&B online needs an API key: look for it before the run starts (wandb asks on a terminal), not at the first
    step's metrics, where wandb would prompt mid-run or, with no terminal, fail with a traceback."""
    import os

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return
    import wandb
    from wandb.errors import UsageError

    try:
        wandb.login(verify=False)  # the key from WANDB_API_KEY, wandb's settings or ~/.netrc; no network call
    except UsageError:
        raise LitLLMError("--logger_name wandb: no W&B API key; run `wandb login` or set WANDB_API_KEY, or set "
                          "WANDB_MODE=offline to log locally and `wandb sync` later") from None


class TrainingLogger:
    """What the loop logs to on global rank 0: `logs/csv/metrics.csv`, and the tracker `--logger_name` names.

    `start` (called by the loop's setup once a resumed checkpoint is read) creates the tracker's run, or
    continues the one the checkpoint names. A continued run has already received the steps the resumed job
    replays (those after its checkpoint, up to the kill): they are not sent again, so its curves have each
    step once; metrics.csv holds the replayed values.
    """

    def __init__(self, name: str, out_dir: Path, run_name: Optional[str] = None, resume: bool = False) -> None:
        self.name, self.out_dir, self.resume = name, Path(out_dir), resume
        self.csv = CSVLogger(self.out_dir / "logs" / "csv", resume=resume)
        self.default_run_name = run_name or self.out_dir.name
        self.tracker = None
        self.naming: Optional[dict[str, Any]] = None
        # {metric: the last step it was logged at} before this process: read before metrics.csv drops the replayed rows
        self._logged: dict[str, int] = {}
        if resume:
            for row in read_csv_rows(self.csv.path):
                self._logged.update(dict.fromkeys(row, int(row["step"])))

    def start(self, naming: Any = None, default_group: Optional[str] = None, saved_run: Optional[dict] = None) -> None:
        """Create the tracker's run named by `naming` (`LoggerArgs`), or continue `saved_run` (a checkpoint's `run_record()`)."""
        naming = naming if naming is not None else _default_naming()
        self.naming = {
            "project": naming.project or "litllm", "run_name": naming.run_name or self.default_run_name,
            "group": naming.group or default_group or "litllm", "tags": list(naming.tags),
        }
        saved_id = saved_run.get("id") if saved_run and saved_run.get("logger") == self.name else None
        log_dir = self.out_dir / "logs" / self.name
        if self.name == "tensorboard":
            self.tracker = tensorboard_logger(log_dir)
        elif self.name == "wandb":
            self.tracker = WandbLogger(log_dir, self.naming, saved_id)
        elif self.name == "mlflow":
            self.tracker = MLflowLogger(log_dir, self.naming, saved_id)
            saved_id = saved_id if self.tracker.resumed else None
        continues = self.resume and (self.name == "tensorboard" or saved_id is not None)
        if not continues:
            self._logged = {}

    def run_record(self) -> Optional[dict[str, Any]]:
        """The tracker run this job logs into ({logger, id, naming, tracking_uri}); saved with every checkpoint."""
        if self.naming is None:
            self.start()
        record = {"logger": self.name, "id": getattr(self.tracker, "run_id", None), **self.naming}
        if hasattr(self.tracker, "tracking_uri"):
            record["tracking_uri"] = self.tracker.tracking_uri
        return record

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        if self.naming is None:
            self.start()
        self.csv.log_hyperparams(params)
        if self.tracker is not None:
            self.tracker.log_hyperparams(params)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if self.naming is None:
            self.start()
        self.csv.log_metrics(metrics, step)
        if self.tracker is not None:
            new = {k: v for k, v in metrics.items() if step > self._logged.get(k, -1)}
            if new:
                self.tracker.log_metrics(new, step)

    def finalize(self, status: str = "success") -> None:
        if self.tracker is not None:
            self.tracker.finalize(status)


def _default_naming():
    from litllm.train.args import LoggerArgs

    return LoggerArgs()


def build_logger(name: str, out_dir: Path, run_name: Optional[str] = None, resume: bool = False) -> TrainingLogger:
    """The logger for global rank 0 (call only there). Logs go to `out_dir/logs/<name>/` (and `logs/csv/`)."""
    check_logger_name(name)
    return TrainingLogger(name, out_dir, run_name, resume=resume)


PLOTTED = ("loss", "val_loss", "lr", "tokens_per_sec")


def loss_history(logger, losses: dict[int, float], val_losses: dict[int, float]) -> dict[str, list[tuple[int, float]]]:
    """Series for the plot ({metric: [(step, value)]}, `PLOTTED`): metrics.csv's full history when there is
    one (it spans resumes), else this process's losses."""
    csv_logger = getattr(logger, "csv", logger)
    if isinstance(csv_logger, CSVLogger):
        series: dict[str, list[tuple[int, float]]] = {key: [] for key in PLOTTED}
        for row in read_csv_rows(csv_logger.path):
            for key in series:
                if key in row:
                    series[key].append((int(row["step"]), float(row[key])))
        return series
    return {"loss": sorted(losses.items()), "val_loss": sorted(val_losses.items())}


def plot_loss_curve(series: dict[str, list[tuple[int, float]]], out_png: Path) -> Optional[Path]:
    """Training and validation loss against step, with the learning rate and tokens/s below it when logged,
    as a PNG; None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)")
        return None
    below = [(key, label) for key, label in (("lr", "learning rate"), ("tokens_per_sec", "tokens/s"))
             if series.get(key)]
    if below:  # the loss on top, full width; the lr and throughput side by side below it, same steps
        fig = plt.figure(figsize=(9, 6.5))
        grid = fig.add_gridspec(2, len(below), height_ratios=(3, 2))
        ax = fig.add_subplot(grid[0, :])
        axes = [fig.add_subplot(grid[1, i], sharex=ax) for i in range(len(below))]
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        axes = []
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = series.get(key) or []
        if points:
            few = key == "val_loss" or len(points) < 20  # short runs: mark the points so they show
            ax.plot(*zip(*points), label=label, marker="o" if few else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    for sub, (key, label) in zip(axes, below):
        points = series[key]
        sub.plot(*zip(*points), color="tab:green" if key == "lr" else "tab:purple", marker="o" if len(points) < 20 else None)
        sub.set_title(label)
        sub.set_xlabel("optimizer step")
        sub.grid(alpha=0.3)
        if key == "lr":
            sub.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        else:  # from 0, in k/M: a drop shows as a drop, not as noise blown up to the axis' height
            from matplotlib.ticker import EngFormatter

            sub.set_ylim(bottom=0, top=max(v for _, v in points) * 1.1 or None)
            sub.yaxis.set_major_formatter(EngFormatter())
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
