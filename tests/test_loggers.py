"""Metric loggers: the CSV log is appended (a step's cost does not grow with the run), and continues on resume."""

from __future__ import annotations

import builtins
import csv
import json
from pathlib import Path

import pytest
import torch

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
    assert logger.tracker is None and logger.run_record()["id"] is None


def test_tensorboard_is_lightnings_and_logs_hyperparameters(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning_fabric.loggers import TensorBoardLogger

    logger = loggers.build_logger("tensorboard", tmp_path, "run")
    logger.log_hyperparams({"train": {"lr": 0.1, "betas": [0.9, 0.95]}, "out_dir": tmp_path, "seed": None})
    assert isinstance(logger.tracker, TensorBoardLogger)
    logger.log_metrics({"loss": 1.0}, 1)
    logger.log_metrics({"loss": 0.9}, 2)
    logger.finalize("success")
    resumed = loggers.build_logger("tensorboard", tmp_path, "run", resume=True)  # the same folder, no version_N
    resumed.start()
    sent = []
    resumed.tracker.log_metrics = lambda metrics, step: sent.append((step, dict(metrics)))
    resumed.log_metrics({"loss": 0.95}, 2)  # replayed after the step-1 checkpoint: TensorBoard has it already
    resumed.log_metrics({"loss": 0.5, "val_loss": 0.7}, 3)
    assert sent == [(3, {"loss": 0.5, "val_loss": 0.7})]
    events = list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) >= 1 and not list((tmp_path / "logs" / "tensorboard").glob("version_*"))
    assert [r["loss"] for r in loggers.read_csv_rows(tmp_path / "logs" / "csv" / "metrics.csv")] == ["1.0", "0.95", "0.5"]


# ---------------------------------------------------------------------- trackers: one run per training job
class Killed(Exception):
    """Stands for the job being killed (SIGKILL, preemption) while it saves a checkpoint."""


def _kill_while_saving(monkeypatch, step_dir: str) -> None:
    import litllm.model_folder as model_folder

    real = model_folder.save_model_weights

    def save(state_dict, path):
        if step_dir in str(path):
            raise Killed(step_dir)
        return real(state_dict, path)

    monkeypatch.setattr(model_folder, "save_model_weights", save)  # checkpoints look it up per call


TIMINGS = {"tokens_per_sec", "samples_per_sec", "flops_per_sec_per_device", "mfu"}  # differ between two runs


def _csv_series(out_dir) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in loggers.read_csv_rows(out_dir / "logs" / "csv" / "metrics.csv"):
        for key, value in row.items():
            if key != "step":
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from conftest import json_file
    from test_finetune import _records

    return json_file(tmp_path_factory, _records())


def _finetune_killed_then_resumed(base, data_file, out_dir, monkeypatch, on_kill=None, **flags):
    """finetune_lora for 6 steps (checkpoints every 2, validation every 2), killed while saving step 4,
    then `--resume auto` (from step 2: steps 3 and 4 are replayed)."""
    from test_finetune import _kwargs

    from litllm.finetune import finetune_lora
    from litllm.train.args import EvalArgs

    kwargs = _kwargs(data_file, max_steps=6, save_interval=2, eval=EvalArgs(interval=2, max_iters=1), **flags)
    with monkeypatch.context() as m:
        _kill_while_saving(m, "step-00000004")
        with pytest.raises(Killed):
            finetune_lora(base, out_dir=out_dir, **kwargs)
    if on_kill is not None:
        on_kill()
    assert sorted(p.name for p in out_dir.glob("step-*")) == ["step-00000002"]
    return finetune_lora(base, out_dir=out_dir, resume="auto", **kwargs)


def test_a_crashed_run_closes_its_mlflow_run_as_failed(base, data_file, tmp_path, monkeypatch):
    """A run that stops on an error (here: the step-3 checkpoint can't be written) leaves its MLflow run
    FAILED, not RUNNING forever; a kill or preemption leaves it open for the resumed job (test above)."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from test_finetune import _kwargs

    from litllm.finetune import finetune_lora

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "crash"
    _kill_while_saving(monkeypatch, "step-00000002")  # an Exception: stands for any crash inside the loop
    with pytest.raises(Killed):
        finetune_lora(base, out_dir=out, logger_name="mlflow", **_kwargs(data_file, max_steps=4, save_interval=2))
    client = MlflowClient((out / "logs" / "mlflow").as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_mlflow_one_run_across_a_kill_and_resume_equals_metrics_csv(base, data_file, tmp_path, monkeypatch):
    """A real local MLflow store: one run, named by --logger.*, whose every metric has each step once and
    (but for timings, which the killed job logged for the replayed steps) the values of metrics.csv."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from litllm.train.args import LoggerArgs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "lora-run"
    naming = LoggerArgs(project="team-x", group="sweep-1", tags=["baseline", "lr=2e-2"])
    _finetune_killed_then_resumed(base, data_file, out, monkeypatch, logger_name="mlflow", logger=naming)

    client = MlflowClient((out / "logs" / "mlflow").as_uri())
    experiment = client.get_experiment_by_name("team-x")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["mlflow.runName"], tags["group"], tags["baseline"], tags["lr"]) == ("lora-run", "sweep-1", "true", "2e-2")
    csv_series = _csv_series(out)
    assert [s for s, _ in csv_series["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in csv_series["val_loss"]] == [2, 4, 6]
    assert set(run.data.metrics) == set(csv_series)
    for key, expected in csv_series.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in history] == [s for s, _ in expected], key  # each step once: no gap, no duplicate
        if key not in TIMINGS:
            assert history == expected, key  # resumed == uninterrupted bit for bit on CPU
    # the run is the one every checkpoint and final/ name; the recipe and provenance are logged with it
    import yaml

    provenance = yaml.safe_load((out / "final" / "provenance.yaml").read_text())
    assert provenance["tracking"]["id"] == run.info.run_id and provenance["tracking"]["project"] == "team-x"
    state = torch.load(out / "step-00000006" / "training_state.pt", weights_only=True)
    assert state["logger_run"]["id"] == run.info.run_id
    assert run.data.params["provenance/data/sha256"] == provenance["data"]["sha256"]
    assert run.data.params["logger/group"] == "sweep-1" and run.data.params["lora_r"] == "8"
    logged = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "litllm_run.yaml", str(tmp_path))).read_text())
    assert logged["provenance"] == provenance and logged["resume"] == "auto"


def _wandb_records(path):
    """The records of an offline run's `.wandb` file (LevelDB log framing of `wandb_internal_pb2.Record`s)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_online_without_an_api_key_fails_before_the_run(base, data_file, tmp_path):
    """No key (no WANDB_API_KEY, no ~/.netrc, no terminal to ask on): one line naming the ways out, before
    anything is written, rather than wandb's traceback at the first step's metrics."""
    pytest.importorskip("wandb")
    from test_errors import fails_cleanly, tree
    from test_pretrain import env_with_tests

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in env_with_tests().items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / ".netrc"), WANDB_CONFIG_DIR=str(home / "wandb"))
    out = tmp_path / "out"
    fails_cleanly(["finetune_lora", base, "--data", "JSON", "--data.json_path", data_file, "--out_dir", out,
                   "--logger_name", "wandb", "--train.max_steps", "1"], tmp_path, "WANDB_MODE=offline", env=env)
    assert tree(out) == {} and tree(home) == {}


@pytest.mark.slow
def test_wandb_offline_one_run_across_a_kill_and_resume(base, data_file, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from litllm.train.args import LoggerArgs

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def process_dies():  # in-process, the killed job's W&B run is still open: end it as a dead process would
        if wandb.run is not None:
            wandb.run.finish(exit_code=1)

    out = tmp_path / "lora-run"
    naming = LoggerArgs(project="team-x", tags=["baseline"])
    _finetune_killed_then_resumed(base, data_file, out, monkeypatch, process_dies, logger_name="wandb", logger=naming)

    files = sorted((out / "logs" / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the killed job and its resume, as `wandb sync` uploads them: into one run
    steps, runs = [], set()
    for file in files:
        for record in _wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                runs.add((record.run.run_id, record.run.project, record.run.run_group, record.run.display_name,
                          tuple(record.run.tags)))
            elif kind == "history" and any(item.nested_key == ["loss"] for item in record.history.item):
                steps.append(record.history.step.num)
    from litllm.config import Config

    (run,) = runs  # one id, named by --logger.* (the group defaults to <method>-<model name>)
    assert run[1:] == ("team-x", f"lora-{Config.from_checkpoint(base).name}", "lora-run", ("baseline",))
    assert steps == [1, 2, 3, 4, 5, 6]  # no gap, no duplicate
    state = torch.load(out / "step-00000006" / "training_state.pt", weights_only=True)
    assert state["logger_run"]["id"] == run[0] and state["logger_run"]["logger"] == "wandb"


def test_provenance_is_in_every_checkpoint_final_and_the_log(tmp_path):
    """The record names the code (litllm version, this checkout's git commit), the data (a fingerprint that
    follows the tokens) and the device layout; final/ and each checkpoint keep it; the logger gets it."""
    import subprocess

    import yaml
    from test_train_loop import FixedTokens, single_fabric, train_once

    import litllm

    fabric = single_fabric()
    out = tmp_path / "a"
    train_once(fabric, out, max_steps=2, save_interval=1)
    record = yaml.safe_load((out / "final" / "provenance.yaml").read_text())
    assert (out / "step-00000001" / "provenance.yaml").read_text() == (out / "final" / "provenance.yaml").read_text()
    assert record["litllm_version"] == litllm.__version__
    repo = Path(litllm.__file__).resolve().parents[1]
    if (repo / ".git").exists():
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert record["git_commit"].split("+")[0] == head.strip()
    assert record["devices"] == {
        "world_size": 1, "num_nodes": 1, "devices_per_node": 1, "accelerator": "cpu", "device_name": "cpu",
        "strategy": "SingleDeviceStrategy", "precision": "32-true",
    }
    assert record["data"]["of"] == "train: tokens of 64 samples; val: tokens of 16 samples"
    assert (out / "final" / "hyperparameters.yaml").is_file()

    def fingerprint(data):
        data.connect(None, batch_size=4, max_seq_length=16)
        data.setup()
        from litllm.train.provenance import data_fingerprint

        return data_fingerprint({"train": data.train_dataloader(), "val": data.val_dataloader()})["sha256"]

    assert fingerprint(FixedTokens()) == record["data"]["sha256"]
    assert fingerprint(FixedTokens(seed=1)) != record["data"]["sha256"]  # other tokens
    assert fingerprint(FixedTokens(pad_every=2)) != record["data"]["sha256"]  # same tokens, other labels

    logger = loggers.build_logger("csv", tmp_path / "b", "b")
    from litllm.train.loop import Method, fit, setup
    from litllm.train.args import EvalArgs, RunArgs, TrainArgs
    from test_train_loop import fresh_model, tiny_config

    fit(setup(fabric, fresh_model(tiny_config()), Method(), FixedTokens(), None, TrainArgs(global_batch_size=8, micro_batch_size=4,
        max_steps=1, save_interval=None), EvalArgs(interval=100, max_iters=1), "AdamW", tmp_path / "b", RunArgs(),
        job={"seed": 42}, logger=logger))
    logged = json.loads((tmp_path / "b" / "logs" / "csv" / "hparams.json").read_text())
    assert logged["seed"] == 42 and logged["provenance"]["data"] == record["data"]
    assert logged["provenance"]["tracking"] == {"logger": "csv", "id": None, "project": "litllm", "run_name": "b",
                                                "group": "full-tiny", "tags": []}


def test_loss_curve_shows_validation_learning_rate_and_throughput(tmp_path, monkeypatch):
    import matplotlib.figure

    drawn = []
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        drawn.append({ax.get_title(): [line.get_xydata().tolist() for line in ax.get_lines()] for ax in fig.axes})
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    log = loggers.build_logger("csv", tmp_path, "run")
    for step in (1, 2, 3):
        log.log_metrics({"loss": 3.0 / step, "lr": 1e-3 * step, "tokens_per_sec": 100.0 * step, "grad_norm": 1.0}, step)
    log.log_metrics({"val_loss": 1.5}, 3)
    png = loggers.plot_loss_curve(loggers.loss_history(log, {}, {}), tmp_path / "loss_curve.png")
    assert png.stat().st_size > 1000
    (axes,) = drawn
    assert axes["loss"] == [[[1, 3.0], [2, 1.5], [3, 1.0]], [[3, 1.5]]]  # train and validation
    assert axes["learning rate"] == [[[1, 1e-3], [2, 2e-3], [3, 3e-3]]]
    assert axes["tokens/s"] == [[[1, 100.0], [2, 200.0], [3, 300.0]]]


def test_logger_flags_parse():
    from test_pretrain import REPO, parse_pretrain_args

    from litllm.train.args import LoggerArgs

    init = parse_pretrain_args(["--config", str(REPO / "config_hub" / "pretrain" / "debug.yaml"), "--logger_name", "mlflow",
                                "--logger.project", "team-x", "--logger.tags", "[baseline, lr=3e-4]"])
    assert init.logger_name == "mlflow"
    assert init.logger == LoggerArgs(project="team-x", tags=["baseline", "lr=3e-4"])
    assert parse_pretrain_args(["--config", str(REPO / "config_hub" / "pretrain" / "debug.yaml")]).logger == LoggerArgs()


@pytest.mark.slow
def test_two_processes_log_one_mlflow_run_from_rank_0(tmp_path, monkeypatch):
    """2 gloo processes (DDP): one MLflow run (rank 0's), each step once; the provenance names the layout."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the store here
    import subprocess
    import sys

    import yaml
    from mlflow import MlflowClient
    from test_pretrain import env_with_tests, fixed_tokens_args
    from test_train_loop import tiny_config

    from litllm.model import GPT
    from litllm.model_folder import model_state_dict, save_model_weights
    from conftest import train_bpe_tokenizer

    initial = tmp_path / "initial"
    initial.mkdir()
    train_bpe_tokenizer(initial, vocab_size=300)
    model = GPT(tiny_config())
    model.reset_parameters()
    save_model_weights(model_state_dict(model), initial / "lit_model.safetensors")
    model.config.save(initial / "model_config.yaml")
    out = tmp_path / "ddp"
    env = {k: v for k, v in env_with_tests().items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "litllm", *fixed_tokens_args(initial, out, 2, "ddp", micro_batch_size=2),
         "--logger_name", "mlflow", "--logger.project", "two-ranks"],
        capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient((out / "logs" / "mlflow").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("two-ranks").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    provenance = yaml.safe_load((out / "final" / "provenance.yaml").read_text())
    assert provenance["devices"]["world_size"] == 2 and provenance["devices"]["strategy"] == "DDPStrategy"
    assert provenance["tracking"]["id"] == run.info.run_id


def test_a_fast_dev_run_is_tagged(tmp_path):
    from test_train_loop import FixedTokens, fresh_model, single_fabric, tiny_config

    from litllm.train.args import EvalArgs, LoggerArgs, RunArgs, TrainArgs
    from litllm.train.loop import Method, fit, setup

    logger = loggers.build_logger("csv", tmp_path, "run")
    fit(setup(single_fabric(), fresh_model(tiny_config()), Method(), FixedTokens(), None,
        TrainArgs(global_batch_size=8, micro_batch_size=4), EvalArgs(), "AdamW", tmp_path,
        RunArgs(fast_dev_run=2, logger=LoggerArgs(tags=["baseline"])), logger=logger))
    logged = json.loads((tmp_path / "logs" / "csv" / "hparams.json").read_text())
    assert logged["provenance"]["tracking"]["tags"] == ["baseline", "fast_dev_run"]


def test_only_a_checkpoint_of_this_out_dir_continues_its_run(tmp_path):
    """`--resume auto` (or this out_dir's step folder) continues the saved run; another out_dir's checkpoint is a fork."""
    from test_train_loop import single_fabric

    from litllm.train.args import LoggerArgs
    from litllm.train.provenance import start_run_record

    class Recording:
        def start(self, naming, default_group, saved_run):
            self.saved_run, self.default_group = saved_run, default_group

        def run_record(self):
            return {"logger": "wandb", "id": "new"}

        def log_hyperparams(self, params):
            self.params = params

    saved = {"logger_run": {"logger": "wandb", "id": "abc12345"}}
    out = tmp_path / "out"
    for resume_dir, expected in [(out / "step-00000002", saved["logger_run"]), (tmp_path / "other" / "step-00000002", None)]:
        logger = Recording()
        start_run_record(single_fabric(), logger, LoggerArgs(), "lora", "tiny", out, resume_dir, saved, {}, {"lora_r": 8})
        assert logger.saved_run == expected and logger.default_group == "lora-tiny"
        assert logger.params["lora_r"] == 8 and logger.params["provenance"]["tracking"] == {"logger": "wandb", "id": "new"}
