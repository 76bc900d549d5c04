"""Issue 15: a default never makes a command fail. The quickstart's debug model (256-token window) and
one with a 64-token window answer through `chat` (stdin), `generate` and `LLM.chat` with no length flags."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import litllm_in_process, train_bpe_tokenizer

from litllm.model_folder import save_model_weights
from litllm.config import Config
from litllm.model import GPT

DEBUG_YAML = Path(__file__).parent.parent / "config_hub" / "pretrain" / "debug.yaml"


@pytest.fixture(scope="module", params=[256, 64], ids=["debug-256", "block-64"])
def small_window_model(request, tmp_path_factory) -> Path:
    """A random model with the quickstart's debug config (and its block_size overridden), not trained."""
    model_config = yaml.safe_load(DEBUG_YAML.read_text())["model_config"]
    assert model_config["block_size"] == 256  # the quickstart's window
    folder = tmp_path_factory.mktemp(f"window{request.param}")
    train_bpe_tokenizer(folder)
    config = Config(**dict(model_config, block_size=request.param))
    torch.manual_seed(0)
    model = GPT(config)
    model.reset_parameters()
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    save_model_weights(weights, folder / "lit_model.safetensors")
    config.save(folder / "model_config.yaml")
    return folder


def _litllm(*args, stdin: str = "") -> subprocess.CompletedProcess:
    # in this process (the console script's `main`, stdin a string): tests/test_chat.py runs chat as a subprocess
    return litllm_in_process(args, stdin=stdin)


def test_chat_without_length_flags_answers(small_window_model):
    proc = _litllm("chat", str(small_window_model), "--temperature", "0", stdin="Hello!\nAnd again?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(">> Model: ") == 2
    window = GPT.from_checkpoint(small_window_model).max_seq_length
    # the default 512 is reduced to half the window, said once, in one line
    notes = [line for line in proc.stderr.splitlines() if "reduced" in line]
    assert notes == [f"--max_new_tokens: the default 512 is reduced to {window // 2} to fit the {window}-token "
                     "context window"]
    # a value the user gave that cannot fit is still a clear error
    proc = _litllm("chat", str(small_window_model), "--max_new_tokens", str(window), stdin="Hi\n")
    assert proc.returncode == 1 and "leaves no room for the conversation" in proc.stderr
    # only the default is halved: a value the user gave may take more of the window, if the message fits
    proc = _litllm("chat", str(small_window_model), "--max_new_tokens", str(window // 2 + 8), "--temperature", "0",
                   stdin="Hi\n/exit\n")
    assert proc.returncode == 0 and proc.stdout.count(">> Model: ") == 1, proc.stderr


def test_generate_without_length_flags_answers(small_window_model):
    proc = _litllm("generate", str(small_window_model), "--prompt", "def ", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Sample 1:" in proc.stderr
    proc = _litllm("generate", str(small_window_model), "--prompt", "def ", "--max_new_tokens", "1000")
    assert proc.returncode == 1 and "--max_new_tokens 1000 does not fit" in proc.stderr


def test_llm_chat_and_generate_without_length_flags_answer(small_window_model, capsys):
    from litllm import LLM

    llm = LLM.load(small_window_model, device="cpu")
    messages = [{"role": "user", "content": "Hello there, how are you today?"}]
    reply = llm.chat(messages)
    assert isinstance(reply, str)
    assert "".join(llm.chat(messages, stream=True)) == reply
    assert isinstance(llm.generate("Hello"), str)
    err = capsys.readouterr().err
    if llm.model.max_seq_length < 256 + 20:  # the chat default (256) did not fit: said once
        assert err.count("max_new_tokens: the default 256 is reduced") == 1
