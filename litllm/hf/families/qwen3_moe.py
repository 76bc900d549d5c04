"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention (per-head qk-norm) with a mixture of
SwiGLU experts: softmax router, top-k, renormalised when `norm_topk_prob`; experts of
`moe_intermediate_size`. A layer is MoE unless listed in `mlp_only_layers` or off the
`decoder_sparse_step` stride, and then runs one dense SwiGLU of `intermediate_size`."""

from litllm.hf.families.llama import FLAGS, WEIGHTS, read_biases, write_biases
from litllm.hf.family import Family, cat, one, register

MLP = "model.layers.{i}.mlp"
WEIGHTS = {
    **WEIGHTS,  # attention, norms, and the dense MLP of mlp_only_layers (`mlp.gate_proj`, ...)
    "blocks.{i}.mlp.router": one(f"{MLP}.gate"),
    "blocks.{i}.mlp.experts.{e}.fc": cat(f"{MLP}.experts.{{e}}.gate_proj", f"{MLP}.experts.{{e}}.up_proj"),
    "blocks.{i}.mlp.experts.{e}.proj": one(f"{MLP}.experts.{{e}}.down_proj"),
}


def read_moe(hf: dict, values: dict) -> None:
    """The routing keys Qwen3-MoE and OLMoE share."""
    n_expert = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 5 writes the latter
    if n_expert is None:
        raise KeyError("num_experts")
    values.update(
        n_expert=n_expert, n_expert_per_token=hf["num_experts_per_tok"],
        moe_normalize_topk=bool(hf.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
    )


def write_moe(c, hf: dict) -> None:
    hf.update(num_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token, norm_topk_prob=c.moe_normalize_topk,
              router_aux_loss_coef=c.router_aux_loss_coef)


def read_config(hf: dict, values: dict) -> None:
    read_biases(hf, values)
    read_moe(hf, values)
    values["moe_intermediate_size"] = hf["moe_intermediate_size"]
    step = hf.get("decoder_sparse_step", 1) or 1
    only_dense = set(hf.get("mlp_only_layers") or [])
    dense = [i for i in range(values["n_layer"]) if i in only_dense or (i + 1) % step != 0]
    values["dense_mlp_layers"] = dense or None


def write_config(c, hf: dict) -> None:
    write_biases(c, hf)
    write_moe(c, hf)
    hf.update(moe_intermediate_size=c.moe_intermediate_size, decoder_sparse_step=1,
              mlp_only_layers=list(c.dense_mlp_layers or []))


QWEN3_MOE = register(Family(
    "qwen3_moe", "Qwen3MoeForCausalLM", {**FLAGS, "norm_qk": "head", "mlp_class_name": "MoE"}, WEIGHTS,
    presets="Qwen3-30B-A3B", stacked_experts="model.layers.{i}.mlp.experts",
    read_config=read_config, write_config=write_config,
))
