"""HF <-> litllm conversion: exact round trips, sharded and .bin inputs, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_models import FAMILIES, VOCAB, make_hf_model, save_hf_checkpoint
from litllm.convert import convert_from_litllm, convert_to_litllm
from litllm.errors import LitLLMError
from litllm.model import GPT


def _hf_tensors(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        if file.name != "lit_model.safetensors":
            tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_bit_exact_and_loads_in_transformers(family, tmp_path):
    import transformers

    src, out = tmp_path / "hf", tmp_path / "export"
    hf_model = save_hf_checkpoint(family, src)
    convert_to_litllm(src)
    convert_from_litllm(src, out)

    original, exported = _hf_tensors(src), _hf_tensors(out)
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name

    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(idx).logits, hf_model(idx).logits, atol=0, rtol=0)


def test_sharded_safetensors_and_sharded_export(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "export"
    hf_model = save_hf_checkpoint("llama", src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    convert_to_litllm(src)
    convert_from_litllm(src, out, max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(hf_model.state_dict())
    for name, tensor in _hf_tensors(src).items():
        assert torch.equal(_hf_tensors(out)[name], tensor)


def test_pytorch_bin_checkpoint(tmp_path):
    hf_model = save_hf_checkpoint("gpt_neox", tmp_path)  # hub names (e.g. `embed_out`), as old .bin files have
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    convert_to_litllm(tmp_path)
    model = GPT.from_checkpoint(tmp_path)
    idx = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[..., :VOCAB], hf_model(idx).logits, atol=1e-4, rtol=0)


def test_dtype_cast(tmp_path):
    save_hf_checkpoint("qwen3", tmp_path)
    convert_to_litllm(tmp_path, dtype="bfloat16")
    with safe_open(str(tmp_path / "lit_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = GPT.from_checkpoint(tmp_path, dtype=torch.float32)
    assert model.wte.weight.dtype == torch.float32


def test_from_checkpoint_keeps_kv_cache_and_rope_on_device(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    convert_to_litllm(tmp_path)
    model = GPT.from_checkpoint(tmp_path)
    assert all(not t.is_meta for t in list(model.parameters()) + list(model.buffers()))


# ---------------------------------------------------------------------- bad input
def test_folder_without_weights(tmp_path):
    make_hf_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(LitLLMError, match="no weights found"):
        convert_to_litllm(tmp_path)
    assert not (tmp_path / "lit_model.safetensors").exists()


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(LitLLMError, match="unsupported model_type 'bert'"):
        convert_to_litllm(tmp_path)


def test_config_that_does_not_match_weights_leaves_nothing_behind(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LitLLMError, match="does not match the weights"):
        convert_to_litllm(tmp_path)
    assert not any(p.name.startswith(".lit_model") or p.name == "lit_model.safetensors" for p in tmp_path.iterdir())
    assert not (tmp_path / "model_config.yaml").exists()


def test_failed_conversion_keeps_previous_output(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    convert_to_litllm(tmp_path)
    before = (tmp_path / "lit_model.safetensors").read_bytes()
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3  # a layer whose weights are missing
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LitLLMError, match="missing"):
        convert_to_litllm(tmp_path)
    assert (tmp_path / "lit_model.safetensors").read_bytes() == before


def test_unused_weights_are_an_error(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 1  # layer 1's weights have no place
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LitLLMError, match="no place"):
        convert_to_litllm(tmp_path)
    assert not (tmp_path / "lit_model.safetensors").exists()


def test_export_refuses_non_empty_output(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "out"
    save_hf_checkpoint("llama", src)
    convert_to_litllm(src)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LitLLMError, match="not empty"):
        convert_from_litllm(src, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "litllm", "convert_to_litllm", str(tmp_path / "missing")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: checkpoint folder not found"]
    (tmp_path / "config.json").write_text("{}")  # a file of the folder given for the folder
    result = subprocess.run([sys.executable, "-m", "litllm", "convert_to_litllm", str(tmp_path / "config.json")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'config.json'}: a file; expected a Hugging Face model folder"]


def test_cli_convert_round_trip(tmp_path):
    src = tmp_path / "hf"
    save_hf_checkpoint("mistral", src)
    # in this process (the console script's `main`): the error test above runs the real `python -m litllm`
    from conftest import litllm_in_process

    result = litllm_in_process(["convert_to_litllm", src])
    assert result.returncode == 0, result.stderr
    result = litllm_in_process(["convert_from_litllm", src, tmp_path / "out"])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "config.json").is_file()
