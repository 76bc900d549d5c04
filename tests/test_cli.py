"""The `litllm` CLI: every command is listed, recipes load with --config, flags override, imports stay light.

Most commands run in this process (`in_process`: `litllm.__main__.main`, its output and exit status); a few run
the real `python -m litllm` (`run`) to prove the console script end to end: `--help`, `--version`, an unknown
command's exit status, and a first finetune whose console output is checked for library noise.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import litllm_in_process, modules_loaded_by

from litllm.__main__ import COMMANDS

HEAVY = ("lightning", "lightning_fabric", "litdata", "lm_eval", "bitsandbytes", "transformers", "wandb", "torchvision",
         "fastapi", "uvicorn")


def run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "litllm", *args], capture_output=True, text=True, **kwargs)


def in_process(*args) -> subprocess.CompletedProcess:
    return litllm_in_process(args)


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert name in result.stdout, name


def test_a_bare_litllm_lists_the_commands():
    bare, helped = in_process(), in_process("--help")
    assert bare.returncode == 0 and bare.stdout == helped.stdout and "generate" in bare.stdout, bare.stderr


def test_help_lists_the_commands_as_their_parsers_do():
    """`litllm --help` lists the commands from stand-ins (names, docstrings read from source) and must print what
    jsonargparse prints from the real functions and their parsers, which it builds only without that shortcut."""
    from jsonargparse import CLI, capture_parser

    from litllm.__main__ import RAW_COMMAND_HELP, _load

    listed = in_process("--help")
    assert listed.returncode == 0, listed.stderr
    components = {name: _load(target) for name, target in {**COMMANDS, **RAW_COMMAND_HELP}.items()}
    parser = capture_parser(lambda: CLI(components, args=[], as_positional=True, prog="litllm"))
    assert listed.stdout == parser.format_help()


def test_help_and_a_commands_start_build_no_other_commands_parser(tmp_path):
    """`litllm --help` imports no command's module (so builds no command's parser); `litllm generate --help`,
    and a run whose `--config` comes before the command, import only generate's."""
    modules = sorted({target.split(":")[0] for target in COMMANDS.values()})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_new_tokens: 2\n")
    loaded = modules_loaded_by({"help": ["--help"], "generate --help": ["generate", "--help"],
                                "--config FILE generate --help": ["--config", str(recipe), "generate", "--help"]},
                               modules)
    assert loaded == {"help": [], "generate --help": ["litllm.generate"],
                      "--config FILE generate --help": ["litllm.generate"]}


@pytest.fixture(scope="module")
def heavy_imports() -> dict:
    """{command module: the HEAVY libraries importing it alone loads}."""
    modules = sorted({target.split(":")[0] for target in COMMANDS.values()})
    return modules_loaded_by({module: ["import", module] for module in modules}, HEAVY)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_modules_import_without_heavy_libraries(name, heavy_imports):
    """`litllm <cmd> --help` must stay fast: no lightning/litdata/lm_eval/bitsandbytes/transformers at import."""
    assert heavy_imports[COMMANDS[name].split(":")[0]] == []


def doc_commands():
    """(doc file, command, its `--flags`, those of them written without a value: followed by another flag or last) of
    every `litllm COMMAND ...` in README.md and tutorials/*.md: code blocks (continuation lines joined) and inline
    code."""
    import re

    from test_pretrain import REPO

    for path in [REPO / "README.md", *sorted((REPO / "tutorials").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        blocks = re.findall(r"```\w*\n(.*?)```", text, re.S)
        inline = [" ".join(code.split())  # one command, wherever the prose wraps it
                  for code in re.findall(r"`(litllm [^`]+)`", re.sub(r"```\w*\n.*?```", "", text, flags=re.S))]
        for chunk in [*blocks, *inline]:
            for line in re.sub(r"\\\n\s*", " ", chunk).splitlines():
                found = re.search(r"\blitllm (\w+)([^#|&]*)", line)  # up to a comment, pipe or `&`
                if found and found.group(1) in COMMANDS:
                    given = re.findall(r"(?<!\S)(--[a-z_][\w.]*)(=|\s+(?!--)\S)?", found.group(2))
                    yield (path.name, found.group(1), [flag for flag, _ in given],
                           [flag for flag, value in given if not value])


def test_the_docs_flags_are_the_commands_flags():
    """Every flag a doc passes to a litllm command is one of that command's flags (a class's own options, such as
    `--data.json_path`, are the class's to check: their prefix must be a class-typed flag), and one written without a
    value is one that takes none (`--help`, a command's `flags_without_value`: `litllm evaluate --tasks`); every
    other flag needs one (`--adapter_only true`, not `--adapter_only`)."""
    from jsonargparse import CLI, capture_parser, set_parsing_settings

    from litllm.__main__ import _load

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    options, wrong, seen, bare_seen = {}, [], 0, 0
    for doc, command, flags, bare in doc_commands():
        if command not in options:
            fn = _load(COMMANDS[command])
            parser = capture_parser(lambda: CLI({command: fn}, args=[command], as_positional=True, prog="litllm"))
            sub = parser._subcommands_action._name_parser_map[command]
            names = {s for a in sub._actions for s in a.option_strings}
            switches = {s for a in sub._actions if a.nargs in (0, "?") for s in a.option_strings} | {"--print_config"}
            options[command] = names, {n.removesuffix(".help") for n in names if n.endswith(".help")}, \
                switches | set(getattr(fn, "flags_without_value", ()))
        names, class_flags, switches = options[command]
        seen, bare_seen = seen + len(flags), bare_seen + len(bare)
        wrong += [f"{doc}: litllm {command} ... {flag}" for flag in flags
                  if flag not in names and flag.rpartition(".")[0] not in class_flags]
        wrong += [f"{doc}: litllm {command} ... {flag} without a value" for flag in bare
                  if flag not in switches and flag.rpartition(".")[0] not in class_flags]
    assert seen > 100 and bare_seen and not wrong, wrong


def test_list_models():
    result = in_process("list_models")
    assert result.returncode == 0
    assert "Llama-3.2-1B" in result.stdout and "meta-llama/Llama-3.2-1B" in result.stdout


def test_config_file_and_flag_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"checkpoint_dir: {tmp_path / 'a'}\ndtype: float16\n")
    result = in_process("convert_to_litllm", "--config", str(recipe), "--dtype", "bfloat16", "--print_config")
    assert result.returncode == 0, result.stderr
    assert "dtype: bfloat16" in result.stdout and f"checkpoint_dir: {tmp_path / 'a'}" in result.stdout


def test_the_folder_on_the_command_line_beats_the_recipes(tmp_path):
    """`litllm finetune_lora CKPT --config recipe.yaml` (the tutorials' form) trains CKPT, not the recipe's
    checkpoint_dir, wherever the folder stands (`litllm estimate` too); a flag after the recipe still overrides it."""
    import yaml

    from test_pretrain import REPO

    from litllm.estimate_cli import parse_command

    recipe = REPO / "config_hub" / "finetune" / "tinyllama" / "lora.yaml"
    assert "TinyLlama" in yaml.safe_load(recipe.read_text())["checkpoint_dir"]
    mine = tmp_path / "my-model"
    for args in ([mine, "--config", recipe], ["--config", recipe, mine], ["--lora_r", "4", mine, "--config", recipe]):
        args = [*map(str, args), "--lora_alpha", "3"]
        printed = in_process("finetune_lora", *args, "--print_config")
        assert printed.returncode == 0, printed.stderr
        printed = yaml.safe_load(printed.stdout)
        assert (printed["checkpoint_dir"], printed["lora_alpha"]) == (str(mine), 3)
        job, _ = parse_command("finetune_lora", args)
        assert (job.checkpoint_dir, job.lora.alpha) == (mine, 3)


def test_unknown_config_key_is_an_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"checkpoint_dir": "x", "dtpye": "float16"}))
    result = in_process("convert_to_litllm", "--config", str(recipe))
    assert result.returncode != 0
    assert "dtpye" in result.stderr


def test_unknown_command_is_an_error():
    result = run("pretrian")
    assert result.returncode != 0
    assert "pretrian" in result.stderr


# ---------------------------------------------------------------------- issue 22: the first hour
@pytest.mark.parametrize("args, hint", [
    (["finetune_lora", "x", "--data", "JSON", "--data.json_pth", "d.json"], "did you mean --data.json_path?"),
    (["finetune_lora", "x", "--data", "Json"], "did you mean JSON?"),
    (["finetune_lora", "x", "--lora_rank", "4"], "did you mean --lora_r?"),
    (["finetune_lora", "x", "--train.global_batchsize", "4"], "did you mean --train.global_batch_size?"),
    (["finetune_lora", "x", "--optimizer", "AdamW", "--optimizer.l", "1"], "did you mean --optimizer.lr?"),
    (["finetune_lora", "x", "--optimizer", "AdamWW", "--optimizer.lr", "1"], "--optimizer AdamWW: no such class (did "
                                                                              "you mean AdamW?)"),
    (["pretrian"], "did you mean pretrain?"),
    (["finetune_lora", "x", "--data.json_path", "d.json"], "it is an option of --data JSON or Preference or Prompts: "
                                                            "name the class before it"),
    (["pretrain", "--data.zzz", "1"], "DataModule has no option 'zzz' (name a class first: --data CLASS)"),
    (["convert_to_gguf", "x"], "missing out_file: litllm convert_to_gguf CHECKPOINT_DIR OUT_FILE [flags]"),
    (["finetune_lora", "x", "--lora_r", "2.5"], "--lora_r: expected an integer, got '2.5'"),
    (["finetune_lora", "x", "--train.max_steps", "abc"], "--train.max_steps: expected an integer or null, got 'abc'"),
    (["generate", "x", "--compile", "maybe"], "--compile: expected true or false or null, got 'maybe'"),
    (["finetune_lora", "x", "--strategy", "fdsp"], "--strategy fdsp: did you mean fsdp?"),
    (["estimate", "finetune_lora", "x", "--lora_rr", "2"], "unknown flag --lora_rr (did you mean --lora_r?) (see "
                                                            "`litllm estimate finetune_lora --help`)"),
    (["convert_to_gguf", "x", "y.gguf", "--adapter_only"], "--adapter_only takes true or false: --adapter_only true"),
    (["finetune_lora", "x", "--data", "JSON", "--data.packing", "--data.json_path", "d.json"],
     "--data.packing takes true or false: --data.packing true"),
    (["generate", "x", "--max_new_tokens"], "--max_new_tokens: expected a value after it"),
    (["finetune_lora", "x", "--data", "JSON"], "missing --data.json_path: --data JSON needs it"),
], ids=["nested-option", "data-class", "top-level-flag", "dataclass-field", "optimizer-option", "optimizer-class",
        "command", "option-before-its-class", "option-of-no-class", "missing-positional", "int-value",
        "optional-int-value", "optional-bool-value", "literal-value", "estimate-flag", "bare-switch",
        "bare-class-option-switch", "no-value", "class-option-missing"])
def test_misspelling_names_the_closest_valid_key(args, hint):
    """One line naming the bad key and the closest valid one, instead of jsonargparse's dump of Union subtypes."""
    result = in_process(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and hint in lines[0], result.stderr
    assert "Subtypes" not in result.stderr and "Traceback" not in result.stderr


def test_a_recipe_path_run_outside_the_checkout_names_the_checkouts_recipe(tmp_path):
    """The docs' `--config config_hub/...`, run from another folder: the one-line error names litllm's own recipe."""
    from test_pretrain import REPO

    result = litllm_in_process(["pretrain", "--config", "config_hub/pretrain/debug.yaml"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --config ") and "file not found" in line, line
    assert f"(litllm's recipe is {REPO / 'config_hub' / 'pretrain' / 'debug.yaml'})" in line, line


@pytest.mark.parametrize("args, class_path", [
    (["--optimizer", "AdamW", "--optimizer.lr", "0.5"], "torch.optim.AdamW"),
    (["--optimizer=SGD", "--optimizer.lr=0.5"], "torch.optim.SGD"),
    (["--optimizer.class_path", "Adam", "--optimizer.init_args.lr", "0.5"], "torch.optim.Adam"),
    (["--optimizer.class_path", "torch.optim.AdamW", "--optimizer.init_args.lr", "0.5"], "torch.optim.AdamW"),
    (["--optimizer", "bitsandbytes.optim.AdamW"], "bitsandbytes.optim.AdamW"),
    (["--optimizer", "bitsandbytes.optim.PagedAdamW8bit", "--optimizer.lr", "0.5"], "bitsandbytes.optim.PagedAdamW8bit"),
], ids=["bare", "bare=", "class_path", "dotted-class_path", "dotted-bitsandbytes", "bitsandbytes-with-settings"])
def test_a_bare_optimizer_name_is_torch_optims_class_beside_bitsandbytes(args, class_path, tmp_path):
    """bitsandbytes.optim has its own AdamW, Adam, SGD...: with it imported (jsonargparse alone then finds a bare
    name ambiguous) a bare name still means torch.optim's class, a dotted path what it names; in a recipe too. A
    bitsandbytes class (its `params` untyped) replaces finetune's default AdamW with settings, from flags or a recipe."""
    pytest.importorskip("bitsandbytes.optim")
    import yaml

    from litllm.estimate_cli import parse_command
    from litllm.train.optimizer import parse_spec

    result = in_process("finetune_lora", "x", *args, "--print_config")
    assert result.returncode == 0, result.stderr
    optimizer = yaml.safe_load(result.stdout)["optimizer"]
    if any("lr" in a for a in args):
        assert (optimizer["class_path"], optimizer["init_args"]["lr"]) == (class_path, 0.5)
    else:
        assert optimizer == class_path
    job, _ = parse_command("finetune_lora", ["x", *args])  # `litllm estimate finetune_lora ...` parses them alike
    cls = parse_spec(job.optimizer)[0]
    assert f"{cls.__module__.split('.')[0]}.optim.{cls.__name__}" == class_path
    recipe = tmp_path / "recipe.yaml"  # a recipe's {class_path, init_args} (a bare name there stays ambiguous)
    recipe.write_text(yaml.safe_dump({"optimizer": {"class_path": class_path, "init_args": {"lr": 0.5}}}))
    result = in_process("finetune_lora", "x", "--config", recipe, "--print_config")
    assert result.returncode == 0, result.stderr
    optimizer = yaml.safe_load(result.stdout)["optimizer"]
    assert (optimizer["class_path"], optimizer["init_args"]["lr"]) == (class_path, 0.5)


def test_estimate_and_version_are_listed():
    assert "estimate" in in_process("--help").stdout
    assert "estimate" in in_process("xyzzy").stderr  # the unknown-command list
    help_text = in_process("estimate", "--help").stdout
    assert all(f"--{flag}" in help_text for flag in ("device_memory", "mfu", "peak_tflops", "gpu", "json"))
    assert "Unvalidated" not in in_process("estimate", "finetune_lora", "--help").stdout
    from importlib.metadata import version

    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"litllm {version('litllm')}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default precision of a CPU machine")
def test_estimate_on_a_cpu_uses_the_runs_precision_and_only_notes_what_was_set(base):
    def estimate(*flags):
        result = in_process("estimate", "finetune_lora", str(base), "--train.max_steps", "10", "--json", *flags)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    plain = estimate()
    assert plain["precision"] == "32-true" and not any("epochs" in note for note in plain["notes"])
    assert estimate("--gpu", "H100")["precision"] == "bf16-mixed"  # a GPU named: its default
    assert any("--train.epochs also set" in note for note in estimate("--train.epochs", "2")["notes"])


RECORDS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}."} for i in range(30)]


def finetune(base, data, out, *flags, own_process: bool = False) -> subprocess.CompletedProcess:
    """`litllm finetune_lora` on `data` in this process, or through `python -m litllm` with `own_process`."""
    # the default prompt style keeps the tiny model's 128-token window enough for every record (Alpaca's is longer)
    from test_errors import run_cli

    args = ["finetune_lora", base, "--data", "JSON", "--data.json_path", data, "--data.prompt_style", "default",
            "--out_dir", out, *flags]
    return run_cli(args, cwd=out.parent) if own_process else litllm_in_process(args, cwd=out.parent)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from conftest import json_file

    return json_file(tmp_path_factory, RECORDS)


@pytest.fixture(scope="module")
def default_run(base, small_data, tmp_path_factory):
    """`finetune_lora` on a 30-record file with the default training flags, through the real CLI (a subprocess: the
    output checked for library noise is all the process prints)."""
    out = tmp_path_factory.mktemp("first_hour") / "lora"
    proc = finetune(base, small_data, out, own_process=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_small_data_finetune_defaults_learn(default_run):
    """Issue 22.1: the global batch and warmup fit a 30-record set (before: 8 steps, all warmup, loss flat)."""
    import csv
    import re

    out, output = default_run
    steps, warmup = map(int, re.search(r"Training (\d+) steps .* warmup (\d+),", output).groups())
    assert "--train.global_batch_size unset: using 1 " in output
    assert steps >= 100 and warmup == steps // 10, output
    rows = [r for r in csv.DictReader(open(next(out.rglob("metrics.csv")))) if r.get("loss")]
    losses = [float(r["loss"]) for r in rows]
    epoch = steps // 5  # one sample per step: the first and the last epoch see the same samples
    assert sum(losses[-epoch:]) / epoch < sum(losses[:epoch]) / epoch - 0.1, losses


def test_finetune_output_is_quiet_and_summarised(default_run):
    import re

    out, output = default_run
    for noise in ("Seed set to", "srun", "\x1b["):
        assert noise not in output
    assert re.search(r"Step \d+: validation loss \d+\.\d{4}", output), output
    assert re.search(r"Done: \d+ steps, [\d,]+ tokens, final loss \d+\.\d{4}, validation loss \d+\.\d{4}", output), output
    assert f"Saved the final model to {out / 'final'}" in output


def test_a_runs_hyperparameters_are_its_recipe(default_run):
    """final/hyperparameters.yaml holds the flags as given: the optimizer as {class_path, init_args} (not the repr of
    jsonargparse's partial), the data module's arguments (not the data sets its setup made), so it reads back as a
    `--config`."""
    import yaml

    out, _ = default_run
    path = out / "final" / "hyperparameters.yaml"
    text = path.read_text()
    assert " object at 0x" not in text and "functools" not in text, text
    recorded = yaml.safe_load(text)
    assert recorded["optimizer"]["class_path"] == "torch.optim.adamw.AdamW"
    assert recorded["optimizer"]["init_args"]["lr"] == 2e-4
    assert not {"train_dataset", "val_dataset", "_packed"} & set(recorded["data"]["init_args"])
    printed = in_process("finetune_lora", "--config", str(path), "--print_config")
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["optimizer"]["init_args"]["lr"] == 2e-4


def test_an_adapter_run_points_at_a_command_that_runs_it(base, small_data, tmp_path):
    """The run's last line names `litllm generate` on its final/ (which loads the adapter model), as for LoRA."""
    import shlex

    out = tmp_path / "adapter"
    proc = litllm_in_process(["finetune_adapter", base, "--data", "JSON", "--data.json_path", small_data,
                              "--data.prompt_style", "default", "--out_dir", out, "--adapter_start_layer", "0",
                              "--train.max_steps", "1", "--eval.final_validation", "false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (hint,) = [line for line in proc.stdout.splitlines() if line.startswith("Try it: litllm ")]
    command = [a.replace("...", "Say the number 3") for a in shlex.split(hint.removeprefix("Try it: litllm "))]
    assert command[:2] == ["generate", str(out / "final")]
    ran = in_process(*command, "--max_new_tokens", "2", "--compile", "false")
    assert ran.returncode == 0, ran.stderr[-3000:]


def test_resuming_another_methods_checkpoint_names_both(default_run, base, small_data, tmp_path):
    """`finetune_full --resume` of a LoRA run's checkpoint: one line naming both methods, not the weights' names."""
    import shutil

    from test_errors import fails_cleanly

    out, _ = default_run
    step = shutil.copytree(max(out.glob("step-*")), tmp_path / "run" / "step-00000001")
    line = fails_cleanly(["finetune_full", base, "--data", "JSON", "--data.json_path", small_data,
                          "--data.prompt_style", "default", "--out_dir", tmp_path / "run", "--resume", step], tmp_path,
                         f"--resume {step}: a checkpoint of a lora run, and this run trains full")
    assert "resume it with the command that wrote it" in line


def test_too_few_steps_get_a_note(base, small_data, tmp_path):
    proc = finetune(base, small_data, tmp_path / "out", "--train.global_batch_size", "16", "--train.epochs", "1",
                    "--eval.final_validation", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Note: this run makes only 1 optimizer step(s), too few to learn much: raise --train.epochs" in proc.stdout


def test_a_max_steps_cut_short_by_the_epochs_gets_a_note(base, small_data, tmp_path):
    """The smallest budget ends the run: a --train.max_steps beyond the epochs' steps says which one did."""
    proc = finetune(base, small_data, tmp_path / "out", "--train.global_batch_size", "16", "--train.epochs", "1",
                    "--train.max_steps", "3", "--eval.final_validation", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Training 1 steps" in proc.stdout and "too few to learn much" not in proc.stdout
    assert "Note: --train.epochs 1 ends the run after 1 step(s), before --train.max_steps 3: raise --train.epochs" \
        in proc.stdout


def test_fast_dev_run_points_at_nothing_it_deletes(base, small_data, tmp_path):
    proc = finetune(base, small_data, tmp_path / "out", "--fast_dev_run", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fast_dev_run passed" in proc.stdout
    for line in ("Saved the final model", "Try it:", "Loss curve:", "Done:"):
        assert line not in proc.stdout + proc.stderr


def test_model_commands_point_from_a_run_folder_to_its_final(default_run):
    from test_errors import fails_cleanly

    out, _ = default_run
    for command in ("chat", "generate"):
        last = fails_cleanly([command, out], out.parent, f"its model is {out / 'final'}")
        assert "a training run's folder" in last


def test_merge_lora_says_where_the_adapter_went(default_run, tmp_path):
    out, _ = default_run
    peft = tmp_path / "peft"
    result = in_process("merge_lora", out / "final", "--out_dir", tmp_path / "merged", "--peft_dir", peft)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Exported the LoRA adapter (Hugging Face PEFT format) to {peft}" in result.stdout
    assert (peft / "adapter_config.json").is_file()


def test_serve_names_a_final_folder_after_its_run():
    from pathlib import Path

    from litllm.serve.server import default_model_name

    assert default_model_name(Path("out/finetune/lora/final")) == "lora"
    assert default_model_name(Path("checkpoints/meta-llama/Llama-3.2-1B")) == "Llama-3.2-1B"
    assert "--model_name" in in_process("serve", "--help").stdout
    result = in_process("serve", "x", "--model_name", " ")
    assert result.returncode == 1 and result.stderr.strip() == "error: --model_name must not be empty"


def test_rerun_into_a_used_out_dir(default_run, base, small_data):
    """Issues 22.2 and 20.8: a new run refuses an out_dir holding another run; a resumed one moves the old
    final/ aside when it holds what another command wrote there, and deletes nothing (last: it changes out)."""
    from test_errors import fails_cleanly, tree

    out, _ = default_run
    (out / "final" / "evaluate").mkdir()
    (out / "final" / "evaluate" / "results.json").write_text("{}")
    before = tree(out)
    last = fails_cleanly(["finetune_lora", base, "--data", "JSON", "--data.json_path", small_data, "--out_dir", out],
                         out.parent, f"--out_dir {out} already holds a run")
    assert "step-" in last and "final/" in last and "--resume auto" in last
    assert tree(out) == before
    old_weights = (out / "final" / "lit_model.safetensors").read_bytes()

    proc = finetune(base, small_data, out, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = out / "final.previous-1"
    assert f"held outputs this run doesn't write (evaluate): kept it as {kept}" in proc.stdout
    assert (kept / "evaluate" / "results.json").read_text() == "{}"
    assert (kept / "lit_model.safetensors").read_bytes() == old_weights
    assert (out / "final" / "lit_model.safetensors").is_file() and not (out / "final" / "evaluate").exists()


@pytest.mark.slow
def test_first_pretrain_output_is_quiet(tmp_path):
    """Issue 22.4/22.5: the quickstart pretrain (made tiny) prints its phases, validation losses and a summary,
    and none of litdata's advert/logs/escape codes, Lightning's srun hint, "Seed set to" or a temporary path."""
    from test_errors import run_cli
    from test_fast_dev_run import pretrain_args

    out = tmp_path / "debug"
    proc = run_cli(pretrain_args(tmp_path, out, "--train.max_steps", "4", "--train.save_interval", "2",
                                 "--eval.interval", "2"), cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    for noise in ("lightning.ai", "inferred", "Worker", "start_method", "Storing the files", "\x1b[", "srun",
                  "Seed set to", ".tmp"):
        assert noise not in output, (noise, output)
    assert proc.stdout.startswith("Trained a") and "\n\n" not in proc.stdout  # no blank progress-bar lines
    assert f"BPE tokenizer on 6 file(s): {out / 'tokenizer'}\n" in output
    assert "Step 2: validation loss" in output and "Step 4: validation loss" in output
    assert "Done: 4 steps" in output


def test_torch_export_deprecation_noise_is_quiet():
    """Each decode-step compile (a first `chat` or `serve`) made torch's export rebuild its own deprecated LeafSpec,
    printing a FutureWarning a litllm user can do nothing about; the CLI silences that one message only."""
    import warnings

    from torch.utils import _pytree

    from litllm.__main__ import _quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_libraries()
        _pytree.LeafSpec()
        warnings.warn("another FutureWarning", FutureWarning)
    assert [str(w.message) for w in caught] == ["another FutureWarning"]
