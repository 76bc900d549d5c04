"""`litllm download` with the real huggingface_hub client against a fake Hub on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_bpe_tokenizer
from fake_hub import FakeHub, FakeRepo

from litllm.download import download
from litllm.errors import LitLLMError

REPO = "tiny-org/tiny-llama"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A HF-style model repo: sharded safetensors + index, tokenizer, plus files download must skip."""
    import transformers
    from tokenizers import Tokenizer as RawTokenizer

    from hf_models import FAMILIES

    folder = tmp_path_factory.mktemp("hub_repo")
    train_bpe_tokenizer(folder)
    n_vocab = RawTokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    config_cls, model_cls, kwargs = FAMILIES["llama"]
    config = getattr(transformers, config_cls)(**dict(kwargs, vocab_size=n_vocab))
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    model.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    (folder / "pytorch_model.bin").write_bytes(b"a second copy of the weights")
    (folder / "consolidated.safetensors").write_bytes(b"another layout")
    (folder / "README.md").write_text("# tiny")
    (folder / "original").mkdir()
    (folder / "original" / "params.json").write_text("{}")
    return folder


@pytest.fixture
def hub(source, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved token, no shared cache
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with FakeHub({
        REPO: FakeRepo.from_folder(source),
        "meta-llama/Llama-3.2-1B-Instruct": FakeRepo.from_folder(source, token="secret-token"),
        "tiny-org/no-weights": FakeRepo({"tokenizer.json": (source / "tokenizer.json").read_bytes()}),
    }) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def _shards(source: Path) -> list[str]:
    return sorted(p.name for p in source.glob("model-*.safetensors"))


def test_download_and_convert(hub, source, tmp_path):
    import transformers

    from litllm.model import GPT

    download(REPO, checkpoint_dir=tmp_path / "checkpoints")
    folder = tmp_path / "checkpoints" / REPO
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts}
    expected = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "model.safetensors.index.json", *_shards(source), "lit_model.safetensors", "model_config.yaml"}
    assert names == expected  # no .bin copy, no consolidated.safetensors, no README, no original/
    assert len(_shards(source)) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    model = GPT.from_checkpoint(folder).eval()
    idx = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[..., : hf.config.vocab_size], hf(idx).logits)


def test_gated_repo_needs_a_token(hub, tmp_path, monkeypatch):
    repo = "meta-llama/Llama-3.2-1B-Instruct"
    with pytest.raises(LitLLMError, match=r"gated repo and no token was given.*--access_token.*HF_TOKEN"):
        download(repo, checkpoint_dir=tmp_path)
    with pytest.raises(LitLLMError, match="gated repo and the token given can't access it"):
        download(repo, checkpoint_dir=tmp_path, access_token="wrong")
    assert not (tmp_path / repo / "lit_model.safetensors").exists()
    download(repo, checkpoint_dir=tmp_path, access_token="secret-token")
    assert (tmp_path / repo / "lit_model.safetensors").is_file()
    # the preset of this repo names the model, so its prompt style is found
    from litllm.prompts import PromptStyle

    assert "name: Llama-3.2-1B-Instruct" in (tmp_path / repo / "model_config.yaml").read_text()
    assert PromptStyle.from_checkpoint(tmp_path / repo).name == "llama3"
    # HF_TOKEN works too
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    download(repo, checkpoint_dir=tmp_path / "again", tokenizer_only=True)
    assert (tmp_path / "again" / repo / "tokenizer.json").is_file()


def test_missing_repo_and_revision(hub, tmp_path):
    with pytest.raises(LitLLMError, match="repository not found"):
        download("tiny-org/does-not-exist", checkpoint_dir=tmp_path)
    with pytest.raises(LitLLMError, match="revision 'v9' not found"):
        download(REPO, checkpoint_dir=tmp_path, revision="v9")
    with pytest.raises(LitLLMError, match="no model weights"):
        download("tiny-org/no-weights", checkpoint_dir=tmp_path)
    with pytest.raises(LitLLMError, match="expected `org/name`"):
        download("not a repo", checkpoint_dir=tmp_path)
    with pytest.raises(LitLLMError, match="--dtype"):
        download(REPO, checkpoint_dir=tmp_path, dtype="float8")


def test_dropped_connection_resumes_with_range(hub, source, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub writes what it received in chunks of DOWNLOAD_CHUNK_SIZE (10 MB) and resumes
    # from the bytes written: small chunks make a tiny shard behave like a big one
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    shard = _shards(source)[0]
    hub.drop_once.add(shard)
    download(REPO, checkpoint_dir=tmp_path, convert_checkpoint=False)
    gets = hub.gets(shard)
    half = (source / shard).stat().st_size // 2
    assert len(gets) == 2, gets
    assert "range" not in gets[0]
    resumed_at = int(gets[1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert half - 1024 < resumed_at <= half  # only the missing part is fetched again
    assert (tmp_path / REPO / shard).read_bytes() == (source / shard).read_bytes()
    assert not (tmp_path / REPO / "lit_model.safetensors").exists()  # --convert_checkpoint false


def test_interrupted_download_is_resumed_by_running_again(hub, source, tmp_path):
    first, last = _shards(source)[0], _shards(source)[-1]
    hub.fail.add(last)
    with pytest.raises(LitLLMError, match="run the same command again"):
        download(REPO, checkpoint_dir=tmp_path)
    folder = tmp_path / REPO
    assert (folder / first).is_file() and not (folder / last).exists()
    assert not (folder / "lit_model.safetensors").exists()
    hub.fail.clear()
    download(REPO, checkpoint_dir=tmp_path)
    assert len(hub.gets(first)) == 1  # not fetched again
    assert (folder / last).read_bytes() == (source / last).read_bytes()
    assert (folder / "lit_model.safetensors").is_file()


def test_tokenizer_only(hub, tmp_path):
    download(REPO, checkpoint_dir=tmp_path, tokenizer_only=True)
    files = {p.name for p in (tmp_path / REPO).iterdir() if p.is_file()}
    assert files == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}


def test_cli(hub, tmp_path):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "litllm", "download", "tiny-org/nope", "--checkpoint_dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: tiny-org/nope: repository not found")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "litllm", "download", "list"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0
    assert "Llama-3.2-1B" in proc.stdout and "meta-llama/Llama-3.2-1B" in proc.stdout
