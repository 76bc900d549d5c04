"""Llama 4 (Scout, Maverick), text model: Llama blocks with
- a mixture of experts in every `interleave_moe_layer_step`-th layer (or those listed in `moe_layers`; the others
  run one dense SwiGLU of `intermediate_size_mlp`): top-k (1) router logits through a sigmoid weight each chosen
  expert's *input*, plus a shared expert; the experts stored stacked and transposed (`experts.gate_up_proj`
  (n_expert, hidden, 2 * expert size), `experts.down_proj`);
- RoPE (llama3 scaling) rotating adjacent pairs of dimensions, absent (NoPE) in every 4th layer (`no_rope_layers`);
- on RoPE layers, chunked local attention (`attention_chunk_size`) and a weightless L2 qk-norm (`use_qk_norm`);
- on NoPE layers, attention temperature tuning (`attn_temperature_tuning`, `floor_scale`, `attn_scale`).
A multimodal `llama4` folder (Llama4ForConditionalGeneration) is read as its `text_config`, the vision model left
out. transformers' Llama4ForCausalLM adds no router loss: `router_aux_loss_coef` is read as 0 (the flag sets one)."""

from litllm.errors import LitLLMError
from litllm.hf.families.llama import FLAGS
from litllm.hf.family import Family, cat, one, register, stacked

LAYER = "model.layers.{i}"
FF = LAYER + ".feed_forward"
WEIGHTS = {
    "wte": one("model.embed_tokens"),
    "blocks.{i}.norm_1": one(f"{LAYER}.input_layernorm"),
    "blocks.{i}.attn.qkv": cat(f"{LAYER}.self_attn.q_proj", f"{LAYER}.self_attn.k_proj", f"{LAYER}.self_attn.v_proj"),
    "blocks.{i}.attn.proj": one(f"{LAYER}.self_attn.o_proj"),
    "blocks.{i}.norm_2": one(f"{LAYER}.post_attention_layernorm"),
    "blocks.{i}.mlp.fc": cat(f"{FF}.gate_proj", f"{FF}.up_proj"),  # the dense layers
    "blocks.{i}.mlp.proj": one(f"{FF}.down_proj"),
    "blocks.{i}.mlp.router": one(f"{FF}.router"),
    "blocks.{i}.mlp.shared_experts.fc": cat(f"{FF}.shared_expert.gate_proj", f"{FF}.shared_expert.up_proj"),
    "blocks.{i}.mlp.shared_experts.proj": one(f"{FF}.shared_expert.down_proj"),
    "blocks.{i}.mlp.experts.{e}.fc": stacked(f"{FF}.experts.gate_up_proj"),  # rows [gate | up]
    "blocks.{i}.mlp.experts.{e}.proj": stacked(f"{FF}.experts.down_proj"),
    "norm_f": one("model.norm"),
    "lm_head": one("lm_head"),
}


def read_config(hf: dict, values: dict) -> None:
    n_layer = values["n_layer"]
    values["attn_bias"] = values["attn_out_bias"] = bool(hf.get("attention_bias", False))
    # sizes: the experts and the shared expert are `intermediate_size`, the dense layers `intermediate_size_mlp`
    values.update(intermediate_size=hf.get("intermediate_size_mlp", 16384), moe_intermediate_size=hf["intermediate_size"],
                  n_expert=hf["num_local_experts"], n_expert_per_token=hf.get("num_experts_per_tok", 1))
    step = hf.get("interleave_moe_layer_step", 1) or 1
    moe_layers = hf.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, n_layer, step))
    values["dense_mlp_layers"] = [i for i in range(n_layer) if i not in set(moe_layers)] or None
    period = hf.get("no_rope_layer_interval", 4)
    flags = hf.get("no_rope_layers") or [int((i + 1) % period != 0) for i in range(n_layer)]
    nope = [i for i, uses_rope in enumerate(flags[:n_layer]) if not uses_rope]
    period = values["nope_layer_period"] = nope[0] + 1 if nope else None
    if [int(bool(f)) for f in flags[:n_layer]] != [int(period is None or (i + 1) % period != 0) for i in range(n_layer)]:
        raise LitLLMError(f"config.json: no_rope_layers {flags} is not one NoPE layer every k layers")
    if hf.get("layer_types") and list(hf["layer_types"]) != _layer_types(hf.get("attention_chunk_size"), flags, n_layer):
        raise LitLLMError(f"config.json: layer_types {hf['layer_types']} is not chunked attention on the RoPE layers")
    values["attention_chunk_size"] = hf.get("attention_chunk_size")
    values["norm_qk"] = "l2" if hf.get("use_qk_norm", True) else None
    if hf.get("attn_temperature_tuning", True):
        values.update(nope_attn_scale=float(hf.get("attn_scale", 0.1)), nope_floor_scale=hf.get("floor_scale", 8192))
    values["router_aux_loss_coef"] = 0.0


def _layer_types(chunk, flags, n_layer: int) -> list[str]:
    return ["chunked_attention" if flags[i] and chunk is not None else "full_attention" for i in range(n_layer)]


def write_config(c, hf: dict) -> None:
    flags = [int(c.uses_rope(i)) for i in range(c.n_layer)]
    dense = set(c.dense_mlp_layers or ())
    hf.update(
        intermediate_size=c.expert_intermediate_size, intermediate_size_mlp=c.intermediate_size,
        num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
        moe_layers=[i for i in range(c.n_layer) if i not in dense], interleave_moe_layer_step=1,
        no_rope_layers=flags, attention_chunk_size=c.attention_chunk_size,
        layer_types=_layer_types(c.attention_chunk_size, flags, c.n_layer), use_qk_norm=c.norm_qk == "l2",
        attn_temperature_tuning=c.nope_attn_scale is not None, attn_scale=c.nope_attn_scale or 0.1,
        floor_scale=c.nope_floor_scale or 8192, attention_bias=c.attn_bias, router_aux_loss_coef=c.router_aux_loss_coef,
    )


LLAMA4 = register(Family(
    "llama4_text", "Llama4ForCausalLM", {**FLAGS, "mlp_class_name": "Llama4MoE", "rope_interleaved": True, "n_shared_expert": 1}, WEIGHTS,
    presets="Llama-4-Scout-17B-16E", read_config=read_config, write_config=write_config, wrappers=("llama4",),
    stacked_experts=FF + ".experts",
))
