"""`litllm chat`: multi-turn REPL driven through stdin (in-process and as a subprocess)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from conftest import litllm_in_process, make_im_end_checkpoint, reference_reply

from litllm.chat import chat, fit_history, read_message
from litllm.errors import LitLLMError
from litllm.model import GPT
from litllm.prompts import PromptStyle
from litllm.tokenizer import Tokenizer


def _expected_replies(checkpoint, turns: list[str], style_name: str, max_new_tokens: int, sys_prompt=None):
    """Greedy replies computed directly: render the growing conversation, generate, decode."""
    model = GPT.from_checkpoint(checkpoint).eval()
    tok, style = Tokenizer(checkpoint), PromptStyle.from_name(style_name)
    history = [{"role": "system", "content": sys_prompt}] if sys_prompt else []
    replies = []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        ids = style.encode(tok, style.render_messages(history))
        reply = reference_reply(model, tok, ids, max_new_tokens, style)
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def _run(monkeypatch, capsys, checkpoint, stdin_text: str, **kwargs) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    chat(checkpoint, temperature=0.0, **kwargs)
    return capsys.readouterr().out


def test_multi_turn_reset_and_exit(tiny_checkpoint, monkeypatch, capsys):
    turns = ["Hello there", "Write a haiku about autumn."]
    expected = _expected_replies(tiny_checkpoint, turns, "chatml", 12, sys_prompt="Be brief.")
    out = _run(monkeypatch, capsys, tiny_checkpoint, "\n".join(turns + ["/reset", turns[1], "/exit", "never read"]) + "\n",
               prompt_style="chatml", max_new_tokens=12, sys_prompt="Be brief.")
    replies = [part.split("\n\n")[0] for part in out.split(">> Model: ")[1:]]
    # the second reply depends on the first exchange; after /reset the same message gets the fresh answer
    fresh = _expected_replies(tiny_checkpoint, [turns[1]], "chatml", 12, sys_prompt="Be brief.")[0]
    assert replies == [expected[0], expected[1], fresh]
    assert expected[1] != fresh
    assert "(conversation cleared)" in out


def test_reply_ends_at_the_special_stop_token(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """chatml's `<|im_end|>` is a special token: the reply ends there (not at max_new_tokens)."""
    folder = tmp_path / "im_end"
    reply = make_im_end_checkpoint(tiny_checkpoint, folder, "Hello there")
    assert _expected_replies(folder, ["Hello there"], "chatml", 20) == [Tokenizer(folder).decode(reply)]
    out = _run(monkeypatch, capsys, folder, "Hello there\n", prompt_style="chatml", max_new_tokens=20)
    assert out.split(">> Model: ")[1].split("\n\n")[0] == Tokenizer(folder).decode(reply)


def test_multiline_input():
    stdin = io.StringIO('one \\\ntwo\n"""\nblock line 1\n\nblock line 3\n"""\nlast\n')
    out = io.StringIO()
    assert read_message(stdin, out) == "one \ntwo"
    assert read_message(stdin, out) == "block line 1\n\nblock line 3"
    assert read_message(stdin, out) == "last"
    assert read_message(stdin, out) is None


def test_multiline_message_reaches_the_model(tiny_checkpoint, monkeypatch, capsys):
    expected = _expected_replies(tiny_checkpoint, ["first line\nsecond line"], "chatml", 8)
    out = _run(monkeypatch, capsys, tiny_checkpoint, '"""\nfirst line\nsecond line\n"""\n',
               prompt_style="chatml", max_new_tokens=8)
    assert out.split(">> Model: ")[1].split("\n\n")[0] == expected[0]


def test_history_drops_oldest_turns(tiny_checkpoint):
    tok, style = Tokenizer(tiny_checkpoint), PromptStyle.from_name("chatml")
    system = {"role": "system", "content": "sys"}
    messages = [system]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "newest"})
    full = style.encode(tok, style.render_messages(messages)).numel()
    kept, ids = fit_history(style, tok, messages, budget=full // 2)
    assert kept[0] == system and kept[-1] == messages[-1]
    assert len(kept) < len(messages) and ids.numel() <= full // 2
    assert kept[1]["role"] == "user"  # whole exchanges are dropped
    assert kept == [system] + messages[len(messages) - len(kept) + 1:]
    with pytest.raises(LitLLMError, match="context window"):
        fit_history(style, tok, [system, {"role": "user", "content": "word " * 500}], budget=50)


def test_long_conversation_keeps_going(tiny_checkpoint, monkeypatch, capsys):
    """The tiny model has a 128-token window: a long chat must drop old turns, not fail."""
    turns = [f"Tell me about topic number {i}, in detail please." for i in range(8)]
    out = _run(monkeypatch, capsys, tiny_checkpoint, "\n".join(turns + ["word " * 300, "short"]) + "\n",
               prompt_style="chatml", max_new_tokens=24)
    assert out.count(">> Model: ") == len(turns) + 1
    assert "error: the message needs" in out  # the over-long message is refused, the chat goes on


def test_chat_subprocess(tiny_checkpoint):
    expected = _expected_replies(tiny_checkpoint, ["Hi!"], "alpaca", 10)
    proc = subprocess.run(
        [sys.executable, "-m", "litllm", "chat", str(tiny_checkpoint), "--prompt_style", "alpaca",
         "--temperature", "0", "--max_new_tokens", "10"],
        input=b"Hi!\n/exit\n", capture_output=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # bytes, so that a "\r" a random model may emit is not turned into "\n"
    assert f">> Model: {expected[0]}\n".encode() in proc.stdout


def test_chat_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(LitLLMError, match="not found"):
        chat(tmp_path / "missing")
    with pytest.raises(LitLLMError, match="leaves no room"):
        chat(tiny_checkpoint, max_new_tokens=10_000)
    proc = litllm_in_process(["chat", tiny_checkpoint, "--temperature", "-1"])  # test_chat_subprocess: the real one
    assert proc.returncode == 1 and "error: --temperature must be >= 0" in proc.stderr
