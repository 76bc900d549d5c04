"""The `litllm` CLI: every command is listed, recipes load with --config, flags override, imports stay light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from litllm.__main__ import COMMANDS


def run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "litllm", *args], capture_output=True, text=True, **kwargs)


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert name in result.stdout, name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_modules_import_without_heavy_libraries(name):
    """`litllm <cmd> --help` must stay fast: no lightning/litdata/lm_eval/bitsandbytes/transformers at import."""
    module = COMMANDS[name].split(":")[0]
    code = (
        f"import sys, {module}; "
        "heavy = [m for m in ('lightning', 'litdata', 'lm_eval', 'bitsandbytes', 'transformers', 'wandb', 'torchvision', 'fastapi', 'uvicorn') "
        "if m in sys.modules]; print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_list_models():
    result = run("list_models")
    assert result.returncode == 0
    assert "Llama-3.2-1B" in result.stdout and "meta-llama/Llama-3.2-1B" in result.stdout


def test_config_file_and_flag_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"checkpoint_dir: {tmp_path / 'a'}\ndtype: float16\n")
    result = run("convert_to_litllm", "--config", str(recipe), "--dtype", "bfloat16", "--print_config")
    assert result.returncode == 0, result.stderr
    assert "dtype: bfloat16" in result.stdout and f"checkpoint_dir: {tmp_path / 'a'}" in result.stdout


def test_unknown_config_key_is_an_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"checkpoint_dir": "x", "dtpye": "float16"}))
    result = run("convert_to_litllm", "--config", str(recipe))
    assert result.returncode != 0
    assert "dtpye" in result.stderr


def test_unknown_command_is_an_error():
    result = run("pretrian")
    assert result.returncode != 0
    assert "pretrian" in result.stderr
