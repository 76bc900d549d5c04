"""`litllm pretrain`: the debug recipe, multi-process equivalence, crash-safe resume, bad input, recipes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import slow_save_cli
from litllm.__main__ import main as cli

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
RECIPES = sorted((REPO / "config_hub" / "pretrain").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")


def read_losses(out_dir: Path, column: str = "loss") -> dict[int, float]:
    with open(out_dir / "logs" / "csv" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


def stdlib_args(tmp_path: Path, out_dir: Path, *extra: str) -> list[str]:
    """A small stdlib run: 12 files, its own 300-token tokenizer, a 2-layer model."""
    return [
        "pretrain", "--config", str(REPO / "config_hub" / "pretrain" / "debug.yaml"),
        "--out_dir", str(out_dir),
        "--data.max_files", "12", "--data.optimized_dir", str(tmp_path / "optimized"), "--data.num_workers", "0",
        "--data.optimize_workers", "1",
        "--tokenizer_vocab_size", "300", "--model_config.vocab_size", "320", "--model_config.n_layer", "2",
        "--train.log_interval", "1", "--train.lr_warmup_steps", "2", "--eval.interval", "100", "--eval.max_iters", "2",
        *extra,
    ]


def env_with_tests() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # as in this process (see one_thread), so results compare bit for bit
    return env


# ---------------------------------------------------------------------- the recipes
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_against_the_command(recipe):
    from litllm.config import Config
    from litllm.data.base import DataModule
    from litllm.train.args import EvalArgs, TrainArgs
    from litllm.train.optimizer import parse_spec

    init = parse_pretrain_args(["--config", str(recipe)])
    assert isinstance(init.data, DataModule)
    assert isinstance(init.train, TrainArgs) and isinstance(init.eval, EvalArgs)
    parse_spec(init.optimizer)
    config = Config.from_name(init.model_name) if init.model_name else init.model_config
    assert isinstance(config, Config)
    assert init.train.max_seq_length is None or init.train.max_seq_length <= config.block_size
    assert (init.tokenizer_dir or init.initial_checkpoint_dir or init.tokenizer_vocab_size) is not None
    if init.tokenizer_vocab_size is not None:
        assert init.tokenizer_vocab_size <= config.padded_vocab_size


def parse_pretrain_args(args: list[str]):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from litllm.pretrain import setup

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(setup)
    return parser.instantiate_classes(parser.parse_args(args))


@pytest.mark.parametrize(
    "args, expected",
    [
        # full class paths: once bitsandbytes is imported (other tests do), a bare "SGD" is ambiguous in-process;
        # the bare form is checked in a fresh process below
        (["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1", "--optimizer.momentum", "0.9"], ("SGD", 0.1, 0.9)),
        (["--optimizer.class_path", "torch.optim.SGD", "--optimizer.init_args.lr", "0.2"], ("SGD", 0.2, 0)),
        (["--optimizer", '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.3, "momentum": 0.5}}'],
         ("SGD", 0.3, 0.5)),
    ],
)
def test_optimizer_flags(args, expected):
    from litllm.train.optimizer import build_optimizer, describe

    spec = parse_pretrain_args(["--data", "TextFiles", *args]).optimizer
    opt = build_optimizer(spec, [torch.nn.Parameter(torch.zeros(1))])
    group = opt.param_groups[0]
    assert (type(opt).__name__, group["lr"], group["momentum"]) == expected
    assert describe(spec)["class_path"] == "torch.optim.sgd.SGD"


def test_bare_optimizer_name_on_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "litllm", "pretrain", "--config", str(REPO / "config_hub" / "pretrain" / "debug.yaml"),
         "--optimizer", "SGD", "--optimizer.lr", "0.1", "--print_config"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "class_path: torch.optim.SGD" in result.stdout and "lr: 0.1" in result.stdout


def test_tinyllama_recipe_is_the_published_one():
    import yaml

    recipe = yaml.safe_load((REPO / "config_hub" / "pretrain" / "tinyllama.yaml").read_text())
    train, opt = recipe["train"], recipe["optimizer"]["init_args"]
    assert recipe["model_name"] == "TinyLlama-1.1B-intermediate-step-1431k-3T"
    assert (train["global_batch_size"], train["micro_batch_size"], train["max_seq_length"]) == (512, 4, 2048)
    assert (opt["lr"], train["min_lr"], train["lr_warmup_steps"]) == (4e-4, 4e-5, 2000)
    assert (opt["weight_decay"], list(opt["betas"]), train["max_norm"]) == (0.1, [0.9, 0.95], 1.0)
    assert train["max_tokens"] == 3_000_000_000_000 and recipe["precision"] == "bf16-mixed"


# ---------------------------------------------------------------------- the debug recipe
def test_debug_recipe_learns_and_generates(tmp_path, capsys):
    out = tmp_path / "out"
    cli(stdlib_args(tmp_path, out, "--train.max_steps", "14", "--train.save_interval", "7"))
    losses = read_losses(out)
    assert sorted(losses) == list(range(1, 15))
    assert losses[14] < losses[1] - 1.0, losses  # visibly falling
    # final/ is a model folder with the run's own tokenizer
    for name in ("lit_model.safetensors", "model_config.yaml", "tokenizer.json", "hyperparameters.yaml"):
        assert (out / "final" / name).is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "loss_curve.png").is_file()

    from litllm.model import GPT

    GPT.from_checkpoint(out / "final")
    capsys.readouterr()
    cli(["generate", str(out / "final"), "--prompt", "def ", "--max_new_tokens", "8", "--temperature", "0"])
    generated = capsys.readouterr()
    assert "8 tokens" in generated.err and generated.out.rstrip("\n")  # (an early model writes mostly spaces)

    # a step checkpoint turns into a model folder; a second conversion won't overwrite it
    cli(["convert_pretrained_checkpoint", str(out / "step-00000007"), str(tmp_path / "model")])
    model = GPT.from_checkpoint(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(
        ["generation_config.json", "lit_model.safetensors", "model_config.yaml", "prompt_style.yaml",
         "tokenizer.json", "tokenizer_config.json"]
    )
    assert model.config.n_layer == 2
    with pytest.raises(SystemExit) as exc:
        cli(["convert_pretrained_checkpoint", str(out / "step-00000007"), str(tmp_path / "model")])
    assert exc.value.code == 1 and "not empty" in capsys.readouterr().err


# ---------------------------------------------------------------------- bad input
def run_cli_expecting_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli(args)
    assert exc.value.code not in (0, None)
    return capsys.readouterr().err.strip()


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    args = stdlib_args(tmp_path, out, "--train.max_steps", "1")
    err = run_cli_expecting_error(args + ["--data.train_data_path", str(empty)], capsys)
    assert err.startswith("error:") and "no files match" in err and len(err.splitlines()) == 1
    assert not out.exists()

    err = run_cli_expecting_error(args + ["--tokenizer_vocab_size", "2000"], capsys)
    assert "exceeds the model's embedding table" in err and not out.exists()

    err = run_cli_expecting_error(args + ["--train.global_batch_size", "12"], capsys)
    assert "divisible" in err and not out.exists()

    err = run_cli_expecting_error(args + ["--logger_name", "neptune"], capsys)  # rejected by the parser
    assert "logger_name" in err and "neptune" in err and not out.exists()


def test_resume_from_another_shape_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    cli(stdlib_args(tmp_path, out, "--train.max_steps", "1", "--train.save_interval", "1"))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    err = run_cli_expecting_error(
        stdlib_args(tmp_path, out, "--train.max_steps", "2", "--model_config.n_layer", "3", "--resume", "auto"), capsys
    )
    assert "another model shape" in err and "n_layer" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_cli_exit_code(tmp_path):
    """Through the real entry point: one `error:` line, exit status 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "litllm", *stdlib_args(tmp_path, tmp_path / "out", "--train.global_batch_size", "12")],
        capture_output=True, text=True, timeout=120, env=env_with_tests(),
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --train.global_batch_size (12) must be divisible")


# ---------------------------------------------------------------------- crash-safe, exact resume
KILL_DURING_SAVE = slow_save_cli("step-00000004", "SAVING STEP 4", 300)


@pytest.mark.slow
def test_sigkill_during_save_then_resume_is_exact(tmp_path):
    steps = ["--train.max_steps", "6", "--train.save_interval", "2", "--train.micro_batch_size", "4"]
    straight = tmp_path / "straight"
    cli(stdlib_args(tmp_path, straight, *steps))

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, *stdlib_args(tmp_path, crashed, *steps)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env_with_tests(),
    )
    try:
        for line in proc.stdout:
            if "SAVING STEP 4" in line:
                break
        else:
            pytest.fail("the run ended without reaching the save of step 4")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in crashed.iterdir())
    assert "step-00000002" in names and "step-00000004" not in names
    assert any(n.startswith(".step-00000004.tmp") for n in names)  # the half-written save stays hidden

    from litllm.train.checkpoints import latest_checkpoint

    assert latest_checkpoint(crashed).name == "step-00000002"
    cli(stdlib_args(tmp_path, crashed, *steps, "--resume", "auto"))
    expected, got = read_losses(straight), read_losses(crashed)
    assert sorted(got) == list(range(1, 7))
    assert got == expected  # bit-identical on CPU, the resumed half included (streaming loader state too)
    assert not any(p.name.startswith(".step-") for p in crashed.iterdir())  # stale temporaries cleaned


# ---------------------------------------------------------------------- multi-process (gloo on CPU)
@pytest.fixture(scope="module")
def initial_model(tmp_path_factory) -> Path:
    """A random tiny model folder, so every run starts from the same weights whatever its strategy."""
    from conftest import train_bpe_tokenizer
    from test_train_loop import tiny_config

    from litllm.model import GPT
    from litllm.model_folder import model_state_dict, save_model_weights

    folder = tmp_path_factory.mktemp("initial")
    train_bpe_tokenizer(folder, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(tiny_config())
    model.reset_parameters()
    save_model_weights(model_state_dict(model), folder / "lit_model.safetensors")
    model.config.save(folder / "model_config.yaml")
    return folder


def fixed_tokens_args(initial: Path, out_dir: Path, devices: int, strategy: str, micro_batch_size: int) -> list[str]:
    return [
        "pretrain", "--initial_checkpoint_dir", str(initial), "--data", "test_train_loop.FixedTokens",
        "--data.pad_every", "3", "--out_dir", str(out_dir), "--devices", str(devices), "--accelerator", "cpu",
        "--strategy", strategy, "--precision", "32-true", "--train.global_batch_size", "8",
        "--train.micro_batch_size", str(micro_batch_size), "--train.max_steps", "4", "--train.save_interval", "2",
        "--train.lr_warmup_steps", "1", "--eval.interval", "100", "--eval.max_iters", "2",
        "--optimizer", "torch.optim.AdamW", "--optimizer.lr", "0.003",
    ]


@pytest.fixture(scope="module")
def single_process_run(initial_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    cli(fixed_tokens_args(initial_model, out, 1, "auto", micro_batch_size=8))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(strategy, initial_model, single_process_run, tmp_path):
    """2 gloo processes x 2 accumulation x micro-batch 2 == 1 process x micro-batch 8, step for step."""
    out = tmp_path / strategy
    proc = subprocess.run(
        [sys.executable, "-m", "litllm", *fixed_tokens_args(initial_model, out, 2, strategy, micro_batch_size=2)],
        capture_output=True, text=True, timeout=300, env=env_with_tests(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference, got = read_losses(single_process_run), read_losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5)
    # the gradient norm (clipped at 1.0) is global too: sharded or replicated, the same clipping
    reference_norms, norms = read_losses(single_process_run, "grad_norm"), read_losses(out, "grad_norm")
    assert reference_norms[1] > 1.0  # clipping was active
    for step, norm in reference_norms.items():
        assert norms[step] == pytest.approx(norm, rel=1e-4)
    from safetensors.torch import load_file

    a = load_file(str(single_process_run / "final" / "lit_model.safetensors"))
    b = load_file(str(out / "final" / "lit_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    # the checkpoint of a 2-process (sharded) run resumes in one process: full, named state dicts
    resumed = tmp_path / "resumed"
    args = fixed_tokens_args(initial_model, resumed, 1, "auto", micro_batch_size=8)
    cli(args + ["--resume", str(out / "step-00000002")])
    assert sorted(read_losses(resumed)) == [3, 4]
