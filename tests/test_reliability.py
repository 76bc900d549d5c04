"""Issue 20's training half: a diverging run never saves NaN, a stale cache never passes for a fresh one,
a killed write leaves nothing behind that the next run trips over, and the README's one-line errors hold.

The killed commands are `python -c` processes (a SIGKILL mid-write), and so are the runs after them (a process
cleans only the temporaries of processes that ended before it started); the diverging run calls the CLI's entry
point in this process (`conftest.litllm_in_process`: its exit status and output, without another interpreter with
torch and Lightning)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import litllm_in_process
from test_errors import run_cli
from test_train_loop import FixedTokens, fabric, fresh_model, tiny_config  # noqa: F401 (fabric: a fixture)

from litllm.errors import LitLLMError
from litllm.train.args import EvalArgs, RunArgs, TrainArgs
from litllm.train.loggers import build_logger, read_csv_rows
from litllm.train.loop import Method, fit, setup, token_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def _all_finite(path: Path) -> bool:
    return all(bool(t.isfinite().all()) for t in load_file(str(path)).values())


# ---------------------------------------------------------------------- 6: a diverging run
def _nan_at(calls: set[int]):
    """The default loss, but NaN at the given (1-based) calls."""
    seen = []

    def loss(model, batch, ignore_index):
        seen.append(1)
        total, count, metrics = token_cross_entropy(model, batch, ignore_index)
        return (total * float("nan") if len(seen) in calls else total), count, metrics

    return loss


def _sgd_run(fabric, out_dir, loss, **train):
    """Plain SGD (no momentum, no decay): a step with zero gradients leaves the weights exactly as they were."""
    args = dict(global_batch_size=4, micro_batch_size=4, max_steps=5, save_interval=1, lr_warmup_steps=0)
    return fit(setup(
        fabric, fresh_model(tiny_config()), Method(loss=loss), FixedTokens(), None, TrainArgs(**{**args, **train}),
        EvalArgs(interval=100, max_iters=1, final_validation=False), {"class_path": "SGD", "init_args": {"lr": 0.5}},
        out_dir, RunArgs(seed=7), logger=build_logger("csv", out_dir, "run"),
    ))


def test_a_nonfinite_step_is_skipped_and_counted(fabric, tmp_path, capsys):
    result = _sgd_run(fabric, tmp_path, _nan_at({3}))
    weights = {s: load_file(str(tmp_path / f"step-{s:08d}" / "lit_model.safetensors")) for s in (2, 3, 4)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # step 3 changed nothing
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # step 4 trained again
    assert math.isnan(result.losses[3]) and all(math.isfinite(result.losses[s]) for s in (1, 2, 4, 5))
    assert _all_finite(tmp_path / "final" / "lit_model.safetensors")
    rows = read_csv_rows(tmp_path / "logs" / "csv" / "metrics.csv")
    assert [float(r["nonfinite_steps"]) for r in rows] == [0, 0, 1, 1, 1]
    assert "optimizer step skipped by step 3" in capsys.readouterr().out


class _NaNGradient(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: a step whose loss is finite but its gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nonfinite_gradients_without_clipping_are_skipped_too(fabric, tmp_path):
    calls = []

    def loss(model, batch, ignore_index):
        calls.append(1)
        total, count, metrics = token_cross_entropy(model, batch, ignore_index)
        return (_NaNGradient.apply(total) if len(calls) == 3 else total), count, metrics

    result = _sgd_run(fabric, tmp_path, loss, max_norm=None, max_steps=4)
    assert all(math.isfinite(v) for v in result.losses.values())  # the loss itself stayed finite
    before, after = (load_file(str(tmp_path / f"step-{s:08d}" / "lit_model.safetensors")) for s in (2, 3))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert float(read_csv_rows(tmp_path / "logs" / "csv" / "metrics.csv")[-1]["nonfinite_steps"]) == 1


def test_nonfinite_steps_in_a_row_stop_the_run_before_any_save(fabric, tmp_path):
    # step 3 is skipped and saved (its weights are step 2's); step 4 is the second in a row: no step-4 save
    with pytest.raises(LitLLMError, match=r"2 optimizer steps in a row, up to step 4 .*step-00000003"):
        _sgd_run(fabric, tmp_path, _nan_at(set(range(3, 100))), max_nonfinite_steps=2, log_interval=10)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [f"step-{s:08d}" for s in (1, 2, 3)]
    assert not (tmp_path / "final").exists()


def test_the_writer_refuses_nonfinite_weights(fabric, tmp_path):
    """A NaN that reached a weight some other way (no clipping, a custom optimizer) is never saved either."""
    from litllm.train.loop import setup

    trainer = setup(fabric, fresh_model(tiny_config()), Method(), FixedTokens(), None,
                    TrainArgs(global_batch_size=4, micro_batch_size=4, max_steps=2, save_interval=1),
                    EvalArgs(), "AdamW", tmp_path, RunArgs())
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("inf")
    for save in (lambda: trainer.writer.save_step(trainer.optimizer, trainer.state, {}), trainer.writer.save_final):
        with pytest.raises(LitLLMError, match="weights hold NaN/inf values.*no checkpoint was saved before"):
            save()
    assert not any(tmp_path.glob("step-*")) and not (tmp_path / "final").exists()


def test_the_guard_makes_no_host_sync(fabric):
    """Under fake tensors any read of a value on the host raises: the per-step check never reads one."""
    from torch._subclasses import FakeTensorMode

    from litllm.train.loop import build_train_model, train_step
    from litllm.train.nonfinite import NonFiniteGuard

    with FakeTensorMode():
        model = fabric.setup_module(build_train_model(tiny_config(), Method()), move_to_device=False)
        opt = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-3))
        guard = NonFiniteGuard(torch.device("cpu"), limit=5)
        batches = [{"input_ids": torch.randint(0, 320, (2, 16)), "labels": torch.randint(0, 320, (2, 16))}] * 2
        for max_norm in (1.0, None):  # clipped: the clipping's norm; unclipped: a gradient check of its own
            train_step(fabric, model, opt, batches, max_norm=max_norm, ignore_index=-100, guard=guard)
    assert guard.step == 2



def test_the_guard_counts_skips_streaks_and_spikes(fabric, capsys):
    from litllm.train.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(torch.device("cpu"), limit=3)
    losses = [5.0] * 12 + [11.0, 5.0, float("nan"), float("nan"), 5.0, float("inf"), float("nan"), float("nan")]
    for loss in losses:
        loss = torch.tensor(loss, dtype=torch.float64)
        guard.record(guard.step_ok(loss, torch.tensor(1.0)), loss)
        if guard.step == 17:  # two NaN steps in a row, then a finite one: below the limit, the run goes on
            assert guard.read(fabric) == {"nonfinite_steps": 2.0, "loss_spikes": 1.0}
            guard.stop_if_diverged()
    assert "loss spike at step 13" in capsys.readouterr().out
    with pytest.raises(LitLLMError, match="at 3 optimizer steps in a row, up to step 20 "):
        guard.check(fabric)
    assert guard.read(fabric)["nonfinite_steps"] == 5


def test_an_output_folder_behind_a_symlink_stays_linked(tmp_path):
    from litllm.utils import output_folder

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("old")
    (tmp_path / "real" / "new.txt").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with output_folder(tmp_path / "link") as folder:
        (folder / "new.txt").write_text("new")
    assert (tmp_path / "link").is_symlink()
    assert {p.name: p.read_text() for p in (tmp_path / "real").iterdir()} == {"keep.txt": "old", "new.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]

@pytest.mark.slow
def test_lr_1e6_through_the_cli_stops_naming_the_step_and_the_last_good_checkpoint(tiny_checkpoint, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}", "output": f"It is {i}."} for i in range(32)]))
    out = tmp_path / "out"
    proc = litllm_in_process(["finetune_full", tiny_checkpoint, "--data", "JSON", "--data.json_path", data,
                              "--data.prompt_style", "default", "--out_dir", out, "--accelerator", "cpu",
                              "--train.max_steps", "30", "--train.save_interval", "2", "--train.global_batch_size",
                              "4", "--train.micro_batch_size", "2", "--train.lr_warmup_steps", "0", "--optimizer.lr",
                              "1e6", "--eval.interval", "1000"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    match = re.match(r"error: training diverged: .* 5 optimizer steps in a row, up to step (\d+) .*"
                     r"the last good checkpoint is (\S+): resume it with `--resume \2`", last)
    assert match, last
    steps = sorted(out.glob("step-*"))
    assert steps and Path(match.group(2)) == steps[-1] and not (out / "final").exists()
    assert int(steps[-1].name[5:]) <= int(match.group(1))
    assert all(_all_finite(s / "lit_model.safetensors") for s in steps)
    assert "Saved the final model" not in proc.stdout


# ---------------------------------------------------------------------- 7: DPO's cached reference log-probs
def test_cached_reference_logps_are_recomputed_for_another_checkpoint(base, tmp_path, capsys):
    """Step 1 of DPO scores the policy against itself: ln 2, unless the cache holds another model's log-probs."""
    import shutil

    from test_dpo import _kwargs, _pairs

    from litllm.finetune import finetune_dpo
    from litllm.model_folder import save_model_weights

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(_pairs()))
    other = tmp_path / "other"
    shutil.copytree(base, other)
    weights = load_file(str(other / "lit_model.safetensors"))
    save_model_weights({k: v * 1.5 for k, v in weights.items()}, other / "lit_model.safetensors")
    out = tmp_path / "out"
    for checkpoint, expected in ((base, "Computing"), (base, "Reusing"), (other, "for another model")):
        for done in [*out.glob("step-*"), out / "final"]:  # the cache stays; the finished run's folders go
            shutil.rmtree(done, ignore_errors=True)
        capsys.readouterr()
        result = finetune_dpo(checkpoint, out_dir=out, **_kwargs(pairs, "full", max_steps=1, precompute_reference=True))
        assert expected in capsys.readouterr().out
        assert abs(result.losses[1] - math.log(2)) < 1e-6, (checkpoint, result.losses[1])


# ---------------------------------------------------------------------- 9: what a SIGKILL leaves behind
KILL_MID_WRITE = """
import sys, time
import litllm.model_folder as model_folder

write = model_folder.SafetensorsWriter.write
def slow_write(self, name, tensor):
    write(self, name, tensor)
    if {part!r} in str(self.path):
        print("writing", self.path, flush=True)
        time.sleep(120)
model_folder.SafetensorsWriter.write = slow_write

from litllm.__main__ import main
main(sys.argv[1:])
"""


def kill_mid_write(args: list, part: str, cwd: Path) -> None:
    """Run the CLI, SIGKILL it while it writes a safetensors file whose path contains `part`."""
    import os
    import signal

    from test_pretrain import env_with_tests

    proc = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE.format(part=part), *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env_with_tests())
    try:
        for line in proc.stdout:
            if line.startswith("writing"):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()  # never reached the write: the assertions below say so
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"{args[0]} finished before reaching the write of {part}"


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.slow
def test_a_killed_conversion_is_cleaned_up_by_the_next_one(tiny_checkpoint, tmp_path):
    out = tmp_path / "hf"
    kill_mid_write(["convert_from_litllm", tiny_checkpoint, out], ".hf.tmp-", tmp_path)
    assert not out.exists() and len(hidden(tmp_path)) == 1  # the half-written .hf.tmp-<pid>
    proc = run_cli(["convert_from_litllm", tiny_checkpoint, out], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert hidden(tmp_path) == [] and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_merge_leaves_the_old_folder_whole_and_the_next_one_replaces_it(base, tmp_path):
    from test_errors import tree
    from test_finetune import _kwargs

    from litllm.finetune import finetune_lora

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}", "output": f"It is {i}."} for i in range(16)]))
    final = finetune_lora(base, out_dir=tmp_path / "run", **_kwargs(data, max_steps=1, save_interval=None)).final_dir
    before = tree(final)
    kill_mid_write(["merge_lora", final, "--precision", "float16"], ".final.tmp-", tmp_path)
    assert tree(final) == before  # nothing new beside the old weights, nothing half-written
    proc = run_cli(["merge_lora", final, "--precision", "float16"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert hidden(final.parent) == [] and hidden(final) == []
    merged = load_file(str(final / "lit_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in merged.values())
    assert {n: b for n, b in tree(final).items() if n != "lit_model.safetensors" and n != "model_config.yaml"} == {
        n: b for n, b in before.items() if n != "lit_model.safetensors" and n != "model_config.yaml"}


@pytest.mark.slow
def test_a_kill_while_final_is_written_costs_nothing_on_resume(tiny_checkpoint, tmp_path):
    from litllm.train.loggers import read_csv_rows

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}", "output": f"It is {i}."} for i in range(16)]))
    out = tmp_path / "out"
    args = ["finetune_full", tiny_checkpoint, "--data", "JSON", "--data.json_path", data, "--data.prompt_style",
            "default", "--out_dir", out, "--accelerator", "cpu", "--train.max_steps", "2", "--train.save_interval", "2",
            "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--eval.interval", "1000"]
    kill_mid_write(args, ".final.tmp-", tmp_path)
    rows = read_csv_rows(out / "logs" / "csv" / "metrics.csv")
    assert hidden(out) and {"loss", "val_loss"} <= set(rows[-1])
    proc = run_cli([*args, "--resume", "auto"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert hidden(out) == [] and (out / "final" / "lit_model.safetensors").is_file()
    resumed = read_csv_rows(out / "logs" / "csv" / "metrics.csv")
    assert [r["step"] for r in resumed] == [r["step"] for r in rows] == ["1", "2"]
    assert resumed[-1]["loss"] == rows[-1]["loss"] and resumed[-1]["val_loss"] == rows[-1]["val_loss"]


def test_stale_temporaries_are_recognised_by_name_and_owner(tmp_path):
    import os
    import time

    from litllm.utils import atomic_write_text, clean_stale_temporaries

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # no process ever has this id (Linux's PID_MAX_LIMIT is 2**22, macOS's 99999); the id of a process that has
    # just exited may be reused at once on a busy machine, keeping "its" temporaries alive
    dead_pid = 2**22 + 1
    try:
        target = tmp_path / "model"
        made = {
            f".model.tmp-{dead_pid}": True,  # a killed write: removed
            f".model.old-{dead_pid}": False,  # the old version moved aside: put back (no `model` now)
            f".model.tmp-{sleeper.pid}": False,  # a live writer's: kept
            f".modelx.tmp-{dead_pid}": False,  # another output's: kept
            f".model.tmp-{dead_pid}.bak": False,  # not our pattern: kept
        }
        for name in made:
            (tmp_path / name).mkdir()
            (tmp_path / name / "f").write_text(name)
            past = time.time() - 3600
            os.utime(tmp_path / name, (past, past))
        clean_stale_temporaries(target)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["model", *(n for n, removed in made.items() if not removed and ".old-" not in n)])
        assert (target / "f").read_text() == f".model.old-{dead_pid}"
        atomic_write_text(tmp_path / "note.txt", "x")  # every atomic write cleans its own output's leftovers
        (tmp_path / f".note.txt.tmp-{dead_pid}").write_text("half")
        os.utime(tmp_path / f".note.txt.tmp-{dead_pid}", (past, past))
        atomic_write_text(tmp_path / "note.txt", "y")
        assert not (tmp_path / f".note.txt.tmp-{dead_pid}").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------- 10: one line, never a traceback
def test_a_litdata_folder_of_pickled_items_is_one_line(tiny_checkpoint, tmp_path):
    import numpy as np
    from litdata.streaming.writer import BinaryWriter

    from test_errors import fails_cleanly

    writer = BinaryWriter(str(tmp_path / "pickled"), chunk_bytes="64KB")  # litdata's default (PyTree) format
    for i in range(4):
        writer.add_item(i, np.arange(100) + i)
    writer.done()
    writer.merge()
    last = fails_cleanly(["pretrain", "--model_name", "pythia-14m", "--tokenizer_dir", tiny_checkpoint, "--data",
                          "LitData", "--data.data_path", tmp_path / "pickled", "--out_dir", tmp_path / "out",
                          "--accelerator", "cpu", "--train.max_steps", "1"], tmp_path, "--data.data_path")
    assert "PyTreeLoader" in last and "TokensLoader" in last


def test_a_hub_file_outside_the_folder_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    from fake_hub import FakeHub, FakeRepo

    from litllm.download import download

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../../escape.safetensors"}}
    files = {name: (tiny_checkpoint / name).read_bytes() for name in ("config.json", "tokenizer.json")}
    files.update({"model.safetensors.index.json": json.dumps(index).encode(), "../../escape.safetensors": b"x"})
    with FakeHub({"org/escape": FakeRepo(files)}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        with pytest.raises(LitLLMError, match=r"org/escape: model.safetensors.index.json's weight_map names "
                                              r"'../../escape.safetensors', a path outside"):
            download("org/escape", checkpoint_dir=tmp_path / "checkpoints")
    assert not (tmp_path / "escape.safetensors").exists()


def test_a_local_index_pointing_outside_its_folder_is_refused(tiny_checkpoint, tmp_path):
    import shutil

    from litllm.convert import convert_to_litllm

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "lit_model.safetensors").unlink()
    shutil.move(folder / "model.safetensors", tmp_path / "outside.safetensors")
    names = load_file(str(tmp_path / "outside.safetensors")).keys()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../outside.safetensors" for n in names}}))
    with pytest.raises(LitLLMError, match=r"model.safetensors.index.json: its weight_map names '../outside.safetensors'"):
        convert_to_litllm(folder)
    assert not (folder / "lit_model.safetensors").exists()


def test_the_peft_export_gets_the_usual_permissions(tiny_checkpoint, tmp_path):
    import os

    from litllm.lora import add_lora, save_peft_adapter
    from litllm.model import GPT
    from litllm.model_folder import save_model_folder

    umask = os.umask(0o022)
    try:
        model = GPT.from_checkpoint(tiny_checkpoint)
        save_model_folder(model, tmp_path / "model", tiny_checkpoint)
        save_peft_adapter(add_lora(model, r=2, alpha=4), tmp_path / "peft")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for folder in ("model", "peft") for p in (tmp_path / folder).iterdir()}
    assert set(modes.values()) == {0o644}, modes
    peft = pytest.importorskip("peft")
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "peft")).r == 2


def test_one_process_asks_the_stop_flag_without_a_device_tensor(fabric, monkeypatch):
    """The preemption check runs every step: on one device it reads a Python flag (no tensor, no host sync)."""
    import os
    import signal

    from litllm.train.preemption import StopOnSignal

    monkeypatch.setattr(torch, "tensor", None)  # any tensor made by `agreed` would fail
    stop = StopOnSignal()
    try:
        assert stop.agreed(fabric) is False
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed(fabric) is True
    finally:
        stop.restore()
