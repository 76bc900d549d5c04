"""Presets: every one builds, has the parameter count transformers gives its HF config, and round-trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import litllm_in_process

from litllm.config import Config, _presets
from litllm.errors import LitLLMError
from litllm.hf.config import config_from_hf, config_to_hf
from litllm.model import GPT

FAMILIES_REQUIRED = [
    "Llama-2-7b-hf", "Llama-2-13b-chat-hf", "Llama-2-70b-hf", "Meta-Llama-3-8B-Instruct", "Llama-3.1-70B",
    "Llama-3.2-1B", "Llama-3.2-3B-Instruct", "Llama-3.3-70B-Instruct", "CodeLlama-7b-hf",
    "TinyLlama-1.1B-intermediate-step-1431k-3T", "Mistral-7B-v0.1", "Mistral-7B-Instruct-v0.3",
    "Mixtral-8x7B-v0.1", "gemma-2b", "gemma-7b", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "gemma-3-1b-it",
    "gemma-3-4b-it", "Qwen2.5-0.5B", "Qwen2.5-72B", "Qwen2.5-Coder-7B", "Qwen3-0.6B", "Qwen3-32B", "phi-2",
    "Phi-3-mini-4k-instruct", "Phi-3.5-mini-instruct", "phi-4", "pythia-14m", "pythia-12b", "falcon-7b",
    "falcon-40b", "SmolLM2-135M", "SmolLM2-1.7B", "OLMo-2-1124-7B", "stablelm-2-1_6b",
]


def num_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_required_presets_exist():
    missing = [n for n in FAMILIES_REQUIRED if n not in sorted(_presets())]
    assert not missing


def _one_per_architecture() -> list[str]:
    """Preset names, one per distinct architecture: a checkpoint's variants (base/instruct/revisions) share it."""
    seen: dict[str, str] = {}
    for name, values in sorted(_presets().items()):
        seen.setdefault(repr(sorted((k, repr(v)) for k, v in values.items() if k not in ("name", "hf_repo"))), name)
    return sorted(seen.values())


@pytest.mark.parametrize("name", _one_per_architecture())
def test_preset_parameter_count_matches_transformers(name, monkeypatch):
    import transformers

    # counting needs no initial values: the MoE presets build tens of thousands of Linear layers
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
    config = Config.from_name(name)
    with torch.device("meta"):
        ours = num_parameters(GPT(config))
        hf_config = config_to_hf(config)
        auto = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
        theirs = num_parameters(transformers.AutoModelForCausalLM.from_config(auto))
    assert ours == theirs


@pytest.mark.parametrize("name", ["Llama-3.1-8B", "gemma-2-9b", "gemma-3-4b-it", "Phi-3.5-mini-instruct",
                                  "falcon-40b", "pythia-160m", "Mixtral-8x7B-v0.1", "OLMo-2-1124-7B", "phi-2",
                                  "Qwen2.5-7B", "Qwen3-8B", "stablelm-2-1_6b", "Mistral-7B-v0.1", "SmolLM3-3B",
                                  "Olmo-3-1025-7B", "granite-3.3-8b-instruct", "DeepSeek-V3", "DeepSeek-V2",
                                  "DeepSeek-V2-Lite", "GLM-4.5", "GLM-4.5-Air"])
def test_hf_config_round_trip(name):
    # HF knows only the embedding rows, not the tokenizer's own vocabulary size
    IGNORED = ("name", "hf_repo", "vocab_size", "padding_multiple")
    config = Config.from_name(name)
    back = config_from_hf(config_to_hf(config))
    mine = {k: v for k, v in dataclasses.asdict(config).items() if k not in IGNORED}
    theirs = {k: v for k, v in dataclasses.asdict(back).items() if k not in IGNORED}
    assert theirs == mine


def test_from_name_overrides_and_lookup_forms():
    config = Config.from_name("Llama-3.2-1B", n_layer=2)
    assert config.n_layer == 2 and config.n_embd == 2048
    assert Config.from_name("meta-llama/Llama-3.2-1B").name == "Llama-3.2-1B"
    assert Config.from_name("llama-3.2-1b").name == "Llama-3.2-1B"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(LitLLMError, match="Did you mean .*Llama-3.2-1B"):
        Config.from_name("Llama-3.2-1")


def test_from_file_rejects_unknown_fields(tmp_path):
    path = tmp_path / "model_config.yaml"
    path.write_text("n_layer: 2\nn_head: 4\nn_embd: 64\nnum_layers: 3\n")
    with pytest.raises(LitLLMError, match=r"model_config.yaml: unknown Config field\(s\) \['num_layers'\]"):
        Config.from_file(path)


def test_save_and_load(tmp_path):
    config = Config.from_name("gemma-2-2b")
    config.save(tmp_path / "model_config.yaml")
    assert Config.from_file(tmp_path / "model_config.yaml") == config


def test_inconsistent_heads_are_rejected():
    with pytest.raises(LitLLMError, match="divisible by n_query_groups"):
        Config(n_embd=64, n_head=4, n_query_groups=3)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type: unsupported 'dynamic'"),
    ({"type": "ntk-by-parts", "factor": 2.0}, "rope_scaling.rope_type: unsupported 'ntk-by-parts'"),
    ({"rope_type": "llama3", "factor": 8.0}, "rope_type 'llama3' needs low_freq_factor, high_freq_factor"),
])
def test_unsupported_rope_scaling_is_rejected_at_conversion(tmp_path, scaling, message):
    """The CLI names config.json's field and exits; nothing is written (it used to fail at the first forward)."""
    from hf_models import save_hf_checkpoint

    save_hf_checkpoint("llama", tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.pop("rope_parameters", None)
    hf["rope_scaling"] = scaling
    (tmp_path / "config.json").write_text(json.dumps(hf))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = litllm_in_process(["convert_to_litllm", tmp_path])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert f"{tmp_path / 'config.json'}: " in result.stderr and message in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no lit_model.safetensors, no model_config.yaml


def test_config_rejects_unsupported_rope_scaling():
    with pytest.raises(LitLLMError, match=r"rope_scaling.rope_type: unsupported 'dynamic'"):
        Config(n_embd=64, n_head=4, rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def test_olmo3_legacy_rope_scaling_reads_as_per_layer_type_parameters():
    """A config.json of transformers 4.x (rope_theta + rope_scaling) and one of 5.x (rope_parameters per
    layer type) give the same Config: YaRN on the full-attention layers, plain RoPE on the sliding ones."""
    yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192, "attention_factor": 1.2}
    common = dict(model_type="olmo3", vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=112, sliding_window=6,
                  layer_types=["sliding_attention"] * 3 + ["full_attention"])
    legacy = config_from_hf({**common, "rope_theta": 500000.0, "rope_scaling": yarn})
    current = config_from_hf({**common, "rope_parameters": {
        "full_attention": {**yarn, "rope_theta": 500000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0}}})
    assert legacy == current
    assert current.rope_scaling == yarn and current.rope_local_base == 500000.0 and current.sliding_window_period == 4


@pytest.mark.parametrize("extra, message", [
    (dict(model_type="smollm3", no_rope_layers=[1, 0, 1, 1]), "no_rope_layers .* not one NoPE layer every k layers"),
    (dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, clip_qkv=8.0), "OLMoE with clip_qkv"),
    (dict(model_type="qwen3_moe", num_experts_per_tok=2, moe_intermediate_size=16), "missing key 'num_experts'"),
    (dict(model_type="deepseek_v2", topk_method="noaux_tc", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), "topk_method 'noaux_tc' is not supported"),
    (dict(model_type="deepseek_v3", scoring_func="softmax", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), "scoring_func 'softmax' is not supported"),
    (dict(model_type="deepseek_v3", moe_layer_freq=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), "moe_layer_freq 2 is not supported"),
    (dict(model_type="deepseek_v3", n_group=3, topk_group=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), "n_expert .4. must split into n_expert_groups .3."),
    (dict(model_type="glm4_moe", n_routed_experts=4, num_experts_per_tok=2), "missing key 'moe_intermediate_size'"),
])
def test_new_families_refuse_what_they_cannot_run_in_one_line(extra, message):
    hf = dict(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=112, **extra)
    with pytest.raises(LitLLMError, match=message):
        config_from_hf(hf)


def test_every_family_has_presets_of_its_own_model_type():
    """Each family's `presets` reference names presets.yaml entries that export as that family."""
    import yaml

    from litllm.config import PRESETS_FILE
    from litllm.hf.family import FAMILIES

    raw = yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8"))
    presets = _presets()
    for family in FAMILIES.values():
        if not family.presets:
            continue
        assert family.presets in raw, family.model_type
        ours = [n for n, v in presets.items() if v.get("hf_model_type") == family.model_type]
        assert ours, family.model_type
        assert family.presets.startswith("_") or family.presets in ours


def test_the_example_family_extension_runs():
    """extensions/example_family.py (the documented way to add a family, #21) registers its family and checks its
    config and weight names round-trip; run as its docstring says, in a process of its own (the registration is
    global)."""
    import subprocess
    import sys

    from test_pretrain import REPO, env_with_tests

    run = subprocess.run([sys.executable, str(REPO / "extensions" / "example_family.py")], capture_output=True,
                         text=True, env=env_with_tests(), timeout=300)
    assert run.returncode == 0, run.stderr
    assert "registered MyLlamaForCausalLM: config and weight names round-trip" in run.stdout
