"""Mixtral: Mistral whose MLP is a mixture of SwiGLU experts (softmax router, top-k renormalised)."""

from litllm.hf.families import mistral
from litllm.hf.families.llama import FLAGS, WEIGHTS
from litllm.hf.family import Family, cat, one, register

MOE = "model.layers.{i}.block_sparse_moe"
WEIGHTS = {
    **{k: v for k, v in WEIGHTS.items() if ".mlp." not in k},
    "blocks.{i}.mlp.router": one(f"{MOE}.gate"),
    "blocks.{i}.mlp.experts.{e}.fc": cat(f"{MOE}.experts.{{e}}.w1", f"{MOE}.experts.{{e}}.w3"),
    "blocks.{i}.mlp.experts.{e}.proj": one(f"{MOE}.experts.{{e}}.w2"),
}


def read_config(hf: dict, values: dict) -> None:
    mistral.read_config(hf, values)
    values.update(n_expert=hf["num_local_experts"], n_expert_per_token=hf["num_experts_per_tok"],
                  router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0))


def write_config(c, hf: dict) -> None:
    mistral.write_config(c, hf)
    hf.update(num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
              router_aux_loss_coef=c.router_aux_loss_coef)


MIXTRAL = register(Family(
    "mixtral", "MixtralForCausalLM", {**FLAGS, "mlp_class_name": "MoE"}, WEIGHTS, presets="Mixtral-8x7B-v0.1",
    stacked_experts="model.layers.{i}.mlp.experts",
    read_config=read_config, write_config=write_config,
))
