"""Register a family at run time: a Llama-structured model under a new HF `model_type`.

    python extensions/example_family.py

A family is one `Family` entry (see `litllm/hf/family.py` and the built-in ones in
`litllm/hf/families/`): its structural flags, its own config.json keys in both directions, its weight
names, its presets. litllm's model, conversion and export pick it up without new classes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from litllm.config import Config
from litllm.hf.config import config_from_hf, config_to_hf
from litllm.hf.families import llama
from litllm.hf.family import Family, one, register
from litllm.hf.weights import hf_sources, weight_map
from litllm.model import GPT


def read_config(hf: dict, values: dict) -> None:
    """This family's own config.json keys -> Config values (the shared ones are already read)."""
    llama.read_biases(hf, values)
    values["logits_divisor"] = float(hf.get("my_logit_divisor", 1.0))


def write_config(config: Config, hf: dict) -> None:
    llama.write_biases(config, hf)
    hf["my_logit_divisor"] = config.logits_divisor


MY_LLAMA = Family(
    model_type="my_llama",
    architecture="MyLlamaForCausalLM",
    flags=dict(llama.FLAGS),
    # Llama's names, except that this family calls its final norm `model.final_norm`
    weights={**llama.WEIGHTS, "norm_f": one("model.final_norm")},
    read_config=read_config,
    write_config=write_config,
)


def main() -> None:
    register(MY_LLAMA)
    config = Config(
        name="my-llama-tiny", hf_model_type="my_llama", vocab_size=128, n_layer=2, n_embd=64, n_head=4,
        n_query_groups=2, intermediate_size=128, logits_divisor=2.0, **llama.FLAGS,
    )
    hf = config_to_hf(config)
    back = config_from_hf(hf)
    assert back.hf_model_type == "my_llama" and back.n_query_groups == 2 and back.logits_divisor == 2.0
    mapping = weight_map(config, "my_llama")
    assert hf_sources("norm_f.weight", mapping).names == ("model.final_norm.weight",)
    assert hf_sources("blocks.1.attn.qkv.weight", mapping).names[0] == "model.layers.1.self_attn.q_proj.weight"
    model = GPT(config)
    model.reset_parameters()
    with tempfile.TemporaryDirectory() as tmp:
        from litllm.model_folder import model_state_dict, save_model_weights

        save_model_weights(model_state_dict(model), Path(tmp) / "lit_model.safetensors")
        config.save(Path(tmp) / "model_config.yaml")
        loaded = GPT.from_checkpoint(tmp)
        idx = torch.randint(0, 128, (1, 8))
        assert torch.equal(loaded(idx), model(idx))
    print(f"registered {hf['architectures'][0]}: config and weight names round-trip")


if __name__ == "__main__":
    main()
