"""Register a family at run time: a Llama-structured model under a new HF `model_type`.

    python extensions/example_family.py

shows that a new family needs only data (flags, a weight-name map, an architecture name):
litllm's model, conversion and export pick it up without new classes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from litllm.config import Config
from litllm.hf import config as hf_config
from litllm.hf import weights as hf_weights
from litllm.model import GPT


def register(model_type: str, architecture: str) -> None:
    hf_config.FAMILY_FLAGS[model_type] = dict(hf_config.FAMILY_FLAGS["llama"])
    hf_config.ARCHITECTURES[model_type] = architecture
    hf_weights.WEIGHT_MAPS[model_type] = hf_weights.WEIGHT_MAPS["llama"]


def main() -> None:
    register("my_llama", "MyLlamaForCausalLM")
    config = Config(
        name="my-llama-tiny", hf_model_type="my_llama", vocab_size=128, n_layer=2, n_embd=64, n_head=4,
        n_query_groups=2, intermediate_size=128, norm_class_name="RMSNorm", mlp_class_name="GatedMLP",
        activation="silu",
    )
    model = GPT(config)
    model.reset_parameters()
    hf = hf_config.config_to_hf(config)
    back = hf_config.config_from_hf(hf)
    assert back.hf_model_type == "my_llama" and back.n_query_groups == 2
    with tempfile.TemporaryDirectory() as tmp:
        from litllm.model_folder import model_state_dict, save_model_weights

        save_model_weights(model_state_dict(model), Path(tmp) / "lit_model.safetensors")
        config.save(Path(tmp) / "model_config.yaml")
        loaded = GPT.from_checkpoint(tmp)
        idx = torch.randint(0, 128, (1, 8))
        assert torch.equal(loaded(idx), model(idx))
    print(f"registered {hf['architectures'][0]}: config and weights round-trip")


if __name__ == "__main__":
    main()
