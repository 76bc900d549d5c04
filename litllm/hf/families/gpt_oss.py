"""gpt-oss (gpt-oss-20b, gpt-oss-120b): Llama-style pre-norm blocks with
- attention sinks: one learned logit per query head joins every softmax's denominator (`self_attn.sinks`);
- alternating sliding-window (128) and full-attention layers (`layer_types`), q/k/v/o biases, YaRN;
- an MoE in every layer: a router with a bias, top-k by logit weighted by the softmax over the chosen logits,
  and experts with biases running a clamped SwiGLU, (up + 1) * gate * sigmoid(1.702 * gate) with gate <= 7 and
  up in [-7, 7] (`swiglu_alpha`, `swiglu_limit`). The experts are stacked tensors, `experts.gate_up_proj`
  (E, C, 2I) with gate and up columns interleaved, and `experts.down_proj` (E, I, C), kept as they are
  (`litllm.model.ClampedSwiGLUExperts`);
- the Hub's checkpoints store those experts in MXFP4 (`*_blocks` / `*_scales`): dequantized at conversion
  (`litllm/hf/mxfp4.py`), exported unquantized."""

from litllm.errors import LitLLMError
from litllm.hf.families.llama import FLAGS, WEIGHTS
from litllm.hf.family import Family, layer_types, one, period_from_layer_types, register, stacked

L = "model.layers.{i}"
WEIGHTS = {k: v for k, v in WEIGHTS.items()
           if k not in ("blocks.{i}.mlp.fc", "blocks.{i}.mlp.proj", "blocks.{i}.attn.q_norm", "blocks.{i}.attn.k_norm")}
WEIGHTS.update({
    "blocks.{i}.attn": one(f"{L}.self_attn"),  # its own parameter: `sinks`
    "blocks.{i}.mlp.router": one(f"{L}.mlp.router"),
    "blocks.{i}.mlp.experts.gate_up": stacked(f"{L}.mlp.experts.gate_up_proj"),
    "blocks.{i}.mlp.experts.down": stacked(f"{L}.mlp.experts.down_proj"),
})
FLAGS = {**FLAGS, "mlp_class_name": "MoE", "attention_sinks": True, "router_bias": True, "moe_normalize_topk": True,
         "swiglu_limit": 7.0, "sliding_window_period": 2}


def read_config(hf: dict, values: dict) -> None:
    quant = (hf.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise LitLLMError(f"config.json: quantization_config.quant_method {quant!r}: only MXFP4 (or none) is read")
    values["attn_bias"] = values["attn_out_bias"] = bool(hf.get("attention_bias", True))
    n_per_token = hf.get("num_experts_per_tok", hf.get("experts_per_token"))
    if n_per_token is None:
        raise KeyError("num_experts_per_tok")
    values.update(
        n_expert=hf["num_local_experts"], n_expert_per_token=n_per_token,
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)), swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
        sliding_window_size=hf.get("sliding_window"),
    )
    if hf.get("layer_types"):
        values["sliding_window_period"] = period_from_layer_types(hf["layer_types"])


def write_config(c, hf: dict) -> None:
    hf.update(
        num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
        router_aux_loss_coef=c.router_aux_loss_coef, swiglu_limit=c.swiglu_limit, swiglu_alpha=c.swiglu_alpha,
        attention_bias=c.attn_bias, sliding_window=c.sliding_window_size, layer_types=layer_types(c),
        rope_parameters={"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_base},
    )
    del hf["rope_scaling"], hf["rope_theta"]


GPT_OSS = register(Family(
    "gpt_oss", "GptOssForCausalLM", FLAGS, WEIGHTS, presets="gpt-oss-120b",
    read_config=read_config, write_config=write_config,
))
