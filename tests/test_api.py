"""The Python API: `from litllm import LLM`."""

from __future__ import annotations

import pytest
from conftest import reference_reply

from litllm.errors import LitLLMError
from litllm.engine import generate_ids
from litllm.model import GPT
from litllm.prompts import PromptStyle
from litllm.tokenizer import Tokenizer

PROMPTS = ["Hello", "The quick brown fox jumps over", "def fibonacci(n):\n    return"]


def _reference(checkpoint, prompt: str, style_name: str, max_new_tokens: int) -> str:
    model, tok = GPT.from_checkpoint(checkpoint).eval(), Tokenizer(checkpoint)
    style = PromptStyle.from_name(style_name)
    ids = style.encode(tok, style.apply(prompt))
    return reference_reply(model, tok, ids, max_new_tokens, style)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    from litllm import LLM

    return LLM.load(tiny_checkpoint, device="cpu", prompt_style="phi2")


def test_generate_stream_and_batch(llm, tiny_checkpoint):
    expected = [_reference(tiny_checkpoint, p, "phi2", 12) for p in PROMPTS]
    assert llm.generate(PROMPTS[0], max_new_tokens=12) == expected[0]
    chunks = list(llm.generate(PROMPTS[0], max_new_tokens=12, stream=True))
    assert len(chunks) > 1 and "".join(chunks) == expected[0]
    assert llm.generate(PROMPTS, max_new_tokens=12) == expected
    assert llm.generate([]) == []


def test_plain_prompt_and_sampling(llm, tiny_checkpoint):
    model, tok = GPT.from_checkpoint(tiny_checkpoint).eval(), Tokenizer(tiny_checkpoint)
    plain = tok.decode(generate_ids(model, tok.encode("Hello").tolist(), 8))
    assert llm.generate("Hello", max_new_tokens=8, apply_prompt_style=False) == plain
    a = llm.generate("Hello", max_new_tokens=8, temperature=1.0, top_k=50, seed=3)
    assert a == llm.generate("Hello", max_new_tokens=8, temperature=1.0, top_k=50, seed=3)
    assert len({llm.generate("Hello", max_new_tokens=8, temperature=1.5, seed=s) for s in range(4)}) > 1


def test_chat(llm, tiny_checkpoint):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"}]
    model, tok = GPT.from_checkpoint(tiny_checkpoint).eval(), Tokenizer(tiny_checkpoint)
    style = llm.prompt_style
    ids = style.encode(tok, style.render_messages(messages))
    expected = reference_reply(model, tok, ids, 10, style)
    assert llm.chat(messages, max_new_tokens=10) == expected
    assert "".join(llm.chat(messages, max_new_tokens=10, stream=True)) == expected


def test_errors(llm, tmp_path):
    from litllm import LLM

    with pytest.raises(LitLLMError, match="context window"):
        llm.generate("word " * 300)
    with pytest.raises(LitLLMError, match="context window"):
        llm.generate(["ok", "word " * 300])
    with pytest.raises(LitLLMError, match="single prompt"):
        llm.generate(["a", "b"], stream=True)
    with pytest.raises(LitLLMError, match="top_p"):
        llm.generate("a", top_p=2.0)
    with pytest.raises(LitLLMError, match="not a model folder, nor a Hub repo id"):
        LLM.load(tmp_path / "missing" / "deep" / "path")
    with pytest.raises(LitLLMError, match="no lit_model.safetensors"):
        LLM.load(tmp_path)


def test_load_repo_id_downloads_once(source_repo_hub, tmp_path):
    from litllm import LLM

    hub, repo = source_repo_hub
    llm = LLM.load(repo, device="cpu", checkpoint_root=tmp_path)
    assert (tmp_path / repo / "lit_model.safetensors").is_file()
    text = llm.generate("Hello", max_new_tokens=5)
    n_requests = len(hub.requests)
    again = LLM.load(repo, device="cpu", checkpoint_root=tmp_path)
    assert len(hub.requests) == n_requests  # already there: no Hub traffic
    assert again.generate("Hello", max_new_tokens=5) == text


@pytest.fixture
def source_repo_hub(tiny_checkpoint, tmp_path_factory, monkeypatch):
    """The tiny checkpoint's HF files served by the fake Hub."""
    import shutil

    from fake_hub import FakeHub, FakeRepo

    folder = tmp_path_factory.mktemp("api_repo")
    for f in tiny_checkpoint.iterdir():
        if f.is_file() and f.name not in ("lit_model.safetensors", "model_config.yaml"):
            shutil.copy2(f, folder / f.name)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    with FakeHub({"tiny-org/api-model": FakeRepo.from_folder(folder)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub, "tiny-org/api-model"


def test_lazy_import():
    import subprocess
    import sys

    code = "import sys, litllm; assert 'litllm.api' not in sys.modules; from litllm import LLM; print(LLM.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "LLM"
