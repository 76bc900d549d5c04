"""Prompt styles: checkpoint chat templates render exactly as transformers' `apply_chat_template`;
built-in styles equal the real families' templates (without the BOS the tokenizer adds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import train_bpe_tokenizer

from litllm.errors import LitLLMError
from litllm.model_folder import PROMPT_STYLE_FILE
from litllm.prompts import PromptStyle, default_style_name, save_prompt_style, style_names
from litllm.tokenizer import Tokenizer

# Chat templates as the families ship them in tokenizer_config.json (whitespace and all).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {{- raise_exception('tools are not used in this test') }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# a plain ChatML template (SmolLM2 / Qwen without a default system prompt) and TinyLlama's (Zephyr)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CHAT = [
    {"role": "user", "content": "  Hello there! How are you?  "},
    {"role": "assistant", "content": "Fine, thanks.\nAnd you?"},
    {"role": "user", "content": "Write a haiku about café life 🙂"},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}] + CHAT


def _checkpoint(folder: Path, template: str | None, name: str = "tiny") -> Path:
    train_bpe_tokenizer(folder)
    if template is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "model_config.yaml").write_text(yaml.safe_dump({"name": name}))
    return folder


@pytest.mark.parametrize("template,conversations", [
    (LLAMA3, [CHAT, WITH_SYSTEM, CHAT[:1]]),
    (QWEN25, [CHAT, WITH_SYSTEM, CHAT[:1]]),
    (GEMMA, [CHAT, CHAT[:1]]),
    (MISTRAL, [CHAT, CHAT[:1]]),
    (PHI3, [CHAT, WITH_SYSTEM]),
], ids=["llama3", "qwen2.5", "gemma", "mistral", "phi3"])
def test_checkpoint_template_matches_apply_chat_template(tmp_path, template, conversations):
    from transformers import AutoTokenizer

    folder = _checkpoint(tmp_path, template)
    style = PromptStyle.from_checkpoint(folder)
    assert style.name == "chat_template" and style.writes_bos
    hf, tok = AutoTokenizer.from_pretrained(folder), Tokenizer(folder)
    for messages in conversations:
        for add_generation_prompt in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            text = style.render_messages(messages, add_generation_prompt=add_generation_prompt)
            assert text == expected
            expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
            expected_ids = expected_ids["input_ids"] if isinstance(expected_ids, dict) or hasattr(expected_ids, "keys") else expected_ids
            assert style.encode(tok, text).tolist() == list(expected_ids)


def test_template_errors_are_clear(tmp_path):
    style = PromptStyle.from_checkpoint(_checkpoint(tmp_path, GEMMA))
    with pytest.raises(LitLLMError, match="System role not supported"):
        style.render_messages(WITH_SYSTEM)
    with pytest.raises(LitLLMError, match="syntax error"):
        PromptStyle.from_chat_template("{% for m in messages %}{{ m }")
    with pytest.raises(LitLLMError, match=r"messages\[0\]"):
        style.render_messages([{"content": "no role"}])


@pytest.mark.parametrize("name,template,bos,conversations", [
    ("llama3", LLAMA3, "<s>", [CHAT, WITH_SYSTEM]),
    ("chatml", CHATML, "", [CHAT, WITH_SYSTEM]),
    ("gemma", GEMMA, "<s>", [CHAT]),
    ("mistral", MISTRAL, "<s>", [CHAT]),
    ("phi3", PHI3, "", [CHAT, WITH_SYSTEM]),
])
def test_builtin_styles_equal_family_templates(tmp_path, name, template, bos, conversations):
    """A built-in style renders what the family's own template renders, minus the leading BOS."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(_checkpoint(tmp_path, template))
    style = PromptStyle.from_name(name)
    for messages in conversations:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert expected.startswith(bos)
        assert style.render_messages(messages) == expected[len(bos):]


def test_alpaca_instruction_and_input():
    style = PromptStyle.from_name("alpaca")
    assert style.apply("Name three colors.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName three colors.\n\n### Response:\n"
    )
    assert style.apply("Summarize.", input="A long text.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarize.\n\n### Input:\nA long text.\n\n### Response:\n"
    )
    assert style.apply("Hi", sys_prompt="Custom preamble.").startswith("Custom preamble.\n\n### Instruction:\nHi")


def test_apply_is_a_single_turn_chat():
    for name in style_names():
        style = PromptStyle.from_name(name)
        text = style.apply("What is 2+2?", sys_prompt="Be brief.")
        assert "What is 2+2?" in text
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
        assert text == style.render_messages(messages)
    assert PromptStyle.from_name("default").apply("plain text") == "plain text"
    assert PromptStyle.from_name("llama2-chat").render_messages(WITH_SYSTEM) == (
        "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHello there! How are you? [/INST] Fine, thanks.\nAnd you? </s>"
        "<s>[INST] Write a haiku about café life 🙂 [/INST]"
    )


def test_unknown_style():
    with pytest.raises(LitLLMError, match="unknown prompt style 'nope'"):
        PromptStyle.from_name("nope")


def test_a_misspelt_style_names_its_flag_and_the_closest_style(tmp_path):
    """One line naming where the name came from (the flag, or prompt_style.yaml's field) and the nearest style."""
    with pytest.raises(LitLLMError, match=r"^--prompt_style: unknown prompt style 'Llama-3' \(did you mean llama3\?\); "
                                          r"expected one of alpaca,") as e:
        PromptStyle.from_checkpoint(None, "Llama-3")
    assert "\n" not in str(e.value)
    (tmp_path / PROMPT_STYLE_FILE).write_text("name: alpca\n")
    with pytest.raises(LitLLMError, match=rf"{PROMPT_STYLE_FILE}: name: unknown prompt style 'alpca' \(did you mean "
                                          r"alpaca\?\)"):
        PromptStyle.from_checkpoint(tmp_path)


def test_from_checkpoint_precedence(tmp_path):
    # family default from the model name
    folder = _checkpoint(tmp_path / "a", None, name="Llama-2-7b-chat-hf")
    assert PromptStyle.from_checkpoint(folder).name == "llama2-chat"
    assert PromptStyle.from_checkpoint(_checkpoint(tmp_path / "b", None, name="pythia-14m")).name == "default"
    # a chat template beats the family default
    folder = _checkpoint(tmp_path / "c", CHATML, name="Llama-2-7b-chat-hf")
    assert PromptStyle.from_checkpoint(folder).name == "chat_template"
    # prompt_style.yaml beats both
    save_prompt_style("alpaca", folder)
    assert PromptStyle.from_checkpoint(folder) == PromptStyle.from_name("alpaca")
    save_prompt_style(PromptStyle.from_checkpoint(_checkpoint(tmp_path / "d", CHATML)), folder)
    assert PromptStyle.from_checkpoint(folder).name == "chat_template"
    custom = PromptStyle("mine", "{% for m in messages %}Q: {{ m['content'] }}\nA:{% endfor %}", ("\nQ:",))
    save_prompt_style(custom, folder)
    loaded = PromptStyle.from_checkpoint(folder)
    assert (loaded.name, loaded.stop_strings) == ("mine", ("\nQ:",))
    assert loaded.apply("hi") == "Q: hi\nA:"
    (folder / "prompt_style.yaml").write_text("name: [unclosed")
    with pytest.raises(LitLLMError, match="prompt_style.yaml"):
        PromptStyle.from_checkpoint(folder)


@pytest.mark.parametrize("model_name,style", [
    ("Meta-Llama-3-8B-Instruct", "llama3"), ("Llama-3.2-1B", "default"), ("Mistral-7B-Instruct-v0.3", "mistral"),
    ("gemma-2-2b-it", "gemma"), ("Qwen2.5-7B-Instruct", "chatml"), ("phi-2", "phi2"),
    ("Phi-3-mini-4k-instruct", "phi3"), ("TinyLlama-1.1B-Chat-v1.0", "tinyllama"), ("falcon-7b-instruct", "falcon"),
    ("OLMo-2-1124-7B-Instruct", "olmo2"), ("stablelm-zephyr-3b", "stablelm-zephyr"),
    ("CodeLlama-7b-Instruct-hf", "codellama"), ("Llama-2-7b-chat-hf", "llama2-chat"),
])
def test_family_defaults(model_name, style):
    assert default_style_name(model_name) == style


def test_stop_tokens(tmp_path):
    folder = _checkpoint(tmp_path, QWEN25)
    tok = Tokenizer(folder)
    im_end = tok.token_to_id("<|im_end|>")
    # the checkpoint template's turn end (<|im_end|>) is found by rendering a reply
    stops = PromptStyle.from_checkpoint(folder).stop_tokens(tok)
    assert [tok.eos_id] in stops and [im_end] in stops
    # built-in multi-token stop strings become token sequences
    stops = PromptStyle.from_name("alpaca").stop_tokens(tok)
    assert stops[0] == [tok.eos_id]
    assert tok.decode(stops[1]) == "### Instruction:" and len(stops[1]) > 1


def test_builtin_styles_render_prefix_by_prefix():
    """A chat rendered up to a user turn (with the generation prompt) is a prefix of the chat with the
    reply: what training masks as prompt is exactly what the model sees at inference."""
    for name in style_names():
        style = PromptStyle.from_name(name)
        for messages in (WITH_SYSTEM + [{"role": "assistant", "content": "Leaves fall."}],):
            for i, m in enumerate(messages):
                if m["role"] == "assistant":
                    prompt = style.render_messages(messages[:i], add_generation_prompt=True)
                    full = style.render_messages(messages[: i + 1], add_generation_prompt=False)
                    assert full.startswith(prompt) and len(full) > len(prompt), (name, i)
