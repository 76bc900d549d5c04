"""Every config in config_hub/finetune parses against its command's signature and makes sense.

Each file is read the way `litllm finetune_* --config FILE` reads it (jsonargparse with the
command's signature), its classes are built (data module, TrainArgs, EvalArgs), and the values are
checked against the model preset the checkpoint_dir names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from litllm.config import Config
from litllm.finetune import _BNB_MODE, finetune_dpo, finetune_full, finetune_grpo, finetune_lora

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "config_hub" / "finetune").glob("*/*.yaml"))
MODELS = {"llama-3.2-1b", "llama-3.1-8b", "mistral-7b", "gemma-2-2b", "qwen2.5-1.5b", "phi-3-mini-4k-instruct", "tinyllama"}
DPO_MODELS = {"llama-3.2-1b", "qwen2.5-1.5b"}  # preference tuning (finetune_dpo)
GRPO_MODELS = {"qwen2.5-1.5b"}  # RL with verifiable rewards (finetune_grpo)


def test_every_model_has_lora_qlora_and_full():
    found = {(p.parent.name, p.stem) for p in CONFIGS}
    assert found == {(m, kind) for m in MODELS for kind in ("lora", "qlora", "full")} | {(m, "dpo") for m in DPO_MODELS} | {(m, "grpo") for m in GRPO_MODELS}


def _parse(path: Path):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    command = {"full": finetune_full, "dpo": finetune_dpo, "grpo": finetune_grpo}.get(path.stem, finetune_lora)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(command, as_positional=True)
    cfg = parser.parse_args(["--config", str(path)])
    return parser.instantiate_classes(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_is_consistent(path):
    from litllm.data.base import DataModule
    from litllm.lora import LoRASettings
    from litllm.train.args import EvalArgs, TrainArgs

    init = _parse(path)
    assert isinstance(init.data, DataModule)
    assert isinstance(init.train, TrainArgs) and isinstance(init.eval, EvalArgs)
    config = Config.from_name(Path(init.checkpoint_dir).name)  # the folder is named after a known preset
    assert str(init.checkpoint_dir) == f"checkpoints/{config.hf_repo}"
    assert init.train.max_seq_length <= config.block_size
    world = init.devices * init.num_nodes
    init.train.gradient_accumulation_iters(world)  # batch sizes divide evenly
    if path.stem == "full":
        assert "lora_r" not in init
        return
    if path.stem == "dpo":
        from litllm.data.preference import Preference
        from litllm.preference import PreferenceSettings

        assert isinstance(init.data, Preference) and init.method in ("lora", "full")
        PreferenceSettings(init.loss, init.beta, init.label_smoothing, init.gamma).validate()
    if path.stem == "grpo":
        from litllm.data.prompts import Prompts
        from litllm.grpo.loss import GRPOSettings
        from litllm.grpo.rewards import load_rewards

        assert isinstance(init.data, Prompts) and init.method in ("lora", "full")
        GRPOSettings(init.num_generations, init.max_new_tokens, init.temperature, init.top_p, init.top_k,
                     init.loss_type, init.epsilon, init.epsilon_high, init.beta, init.scale_rewards,
                     init.num_iterations, init.mask_truncated_completions).validate()
        assert [r.name for r in load_rewards(init.reward, init.reward_weights, init.format_pattern)] == ["accuracy",
                                                                                                         "format"]
        assert init.max_new_tokens < init.train.max_seq_length
    settings = LoRASettings.from_flags(dict(init))
    assert not (settings.head and config.tie_embeddings)
    if path.stem == "qlora":
        assert init.quantize in _BNB_MODE
    else:
        assert init.quantize is None
