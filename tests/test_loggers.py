"""Metric loggers: the CSV log is appended (a step's cost does not grow with the run), and continues on resume."""

from __future__ import annotations

import builtins
import csv
import json

import pytest

from litllm.train import loggers


class CountingOpen:
    """`open` that counts the bytes written and the files opened for (re)writing from scratch."""

    def __init__(self) -> None:
        self.bytes_written = 0
        self.rewrites = 0

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        if "w" in mode:
            self.rewrites += 1
        counter, write = self, handle.write

        def counted_write(data):
            counter.bytes_written += len(data)
            return write(data)

        handle.write = counted_write
        return handle


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_step_cost_does_not_grow_with_rows(tmp_path, monkeypatch):
    counting = CountingOpen()
    monkeypatch.setattr(loggers, "open", counting, raising=False)  # the module's `open` lookup finds it first
    log = loggers.CSVLogger(tmp_path)
    metrics = {"loss": 2.345678, "lr": 0.000123, "tokens": 123456}

    def cost_of_ten_steps(first: int) -> tuple[int, int]:
        before = (counting.bytes_written, counting.rewrites)
        for step in range(first, first + 10):
            log.log_metrics(metrics, step)
        return counting.bytes_written - before[0], counting.rewrites - before[1]

    for step in range(1, 21):
        log.log_metrics(metrics, step)
    early_bytes, early_rewrites = cost_of_ten_steps(21)
    for step in range(31, 3001):
        log.log_metrics(metrics, step)
    late_bytes, late_rewrites = cost_of_ten_steps(3001)
    assert early_rewrites == late_rewrites == 0  # no rewrite of the file in steady state
    row_bytes = len("3001,2.345678,0.000123,123456\r\n")
    assert late_bytes <= 10 * (row_bytes + 2) and early_bytes <= 10 * (row_bytes + 2)  # each step: its own row
    # a val_loss of the step just written rewrites only that row (plus one header rewrite for the new column)
    log.log_metrics({"val_loss": 1.5}, 3010)
    before = counting.bytes_written
    log.log_metrics(metrics, 3011)
    log.log_metrics({"val_loss": 1.25}, 3011)
    assert counting.bytes_written - before < 4 * row_bytes
    rows = _rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 3012))
    assert (rows[-2]["val_loss"], rows[-1]["val_loss"], rows[-1]["loss"]) == ("1.5", "1.25", "2.345678")


def test_csv_resume_continues_the_log_with_each_step_once(tmp_path):
    first = loggers.CSVLogger(tmp_path, resume=False)
    first.log_metrics({"val_loss": 5.0}, 0)
    for step in range(1, 7):
        first.log_metrics({"loss": float(step)}, step)
    first.log_metrics({"val_loss": 4.0}, 4)  # not the last step: a new row is never merged into an old one
    # killed mid-write: a last line cut short
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("7,7.5")
    resumed = loggers.CSVLogger(tmp_path, resume=True)  # resumed from the step-4 checkpoint: replays 5, 6, ...
    for step in range(5, 9):
        resumed.log_metrics({"loss": 10.0 * step, "grad_norm": 0.5}, step)
    rows = _rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in rows[6:]] == ["50.0", "60.0", "70.0", "80.0"]
    assert rows[0]["val_loss"] == "5.0" and rows[1]["grad_norm"] == ""
    series = loggers.loss_history(resumed, {}, {})
    assert series["val_loss"] == [(0, 5.0), (4, 4.0)]
    assert [s for s, _ in series["loss"]] == [1, 2, 3, 4, 5, 6, 7, 8]

    fresh = loggers.CSVLogger(tmp_path, resume=False)  # a fresh run in the same out_dir starts over
    fresh.log_metrics({"loss": 1.0}, 3)
    assert [r["step"] for r in _rows(tmp_path / "metrics.csv")] == ["3"]


@pytest.mark.parametrize("then", ["a row", "a new column"])
def test_csv_on_a_full_disk_keeps_every_complete_row(then, tmp_path):
    """The disk fills up between two steps: the write fails with one line naming metrics.csv, and the file
    still holds exactly the rows written before (no half row, no temporary file)."""
    from test_errors import fill, tmpfs

    from litllm.errors import LitLLMError

    with tmpfs(tmp_path / "disk", "64k") as disk:
        logger = loggers.CSVLogger(disk / "logs")
        for step in (1, 2, 3):
            logger.log_metrics({"loss": 1.0 / step}, step)
        fill(disk)
        step = 4  # rows are appended into the file's last page until it is full
        with pytest.raises(LitLLMError, match=r"metrics\.csv.*no space left"):
            for step in range(4, 1000):
                before = (disk / "logs" / "metrics.csv").read_bytes()
                logger.log_metrics({"loss": 0.25, **({"val_loss": 0.3} if then == "a new column" else {})}, step)
        assert (disk / "logs" / "metrics.csv").read_bytes() == before
        assert sorted(p.name for p in (disk / "logs").iterdir()) == ["metrics.csv"]
        rows = loggers.read_csv_rows(disk / "logs" / "metrics.csv")
        assert [int(r["step"]) for r in rows] == list(range(1, step))


def test_csv_hyperparameters(tmp_path):
    logger = loggers.build_logger("csv", tmp_path, "run")
    logger.log_hyperparams({"train": {"lr": 0.1}, "out_dir": tmp_path})
    assert json.loads((tmp_path / "logs" / "csv" / "hparams.json").read_text())["train"] == {"lr": 0.1}


def test_tensorboard_is_lightnings_and_logs_hyperparameters(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.fabric.loggers import TensorBoardLogger

    logger = loggers.build_logger("tensorboard", tmp_path, "run")
    assert isinstance(logger, TensorBoardLogger)
    logger.log_hyperparams({"train": {"lr": 0.1, "betas": [0.9, 0.95]}, "out_dir": tmp_path, "seed": None})
    logger.log_metrics({"loss": 1.0}, 1)
    logger.finalize("success")
    resumed = loggers.build_logger("tensorboard", tmp_path, "run", resume=True)  # the same folder, no version_N
    resumed.log_metrics({"loss": 0.5}, 2)
    resumed.finalize("success")
    events = list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) >= 1 and not list((tmp_path / "logs" / "tensorboard").glob("version_*"))
