"""Granite 3.x: Llama with four scalars: embeddings multiplied by `embedding_multiplier`, each branch's
output by `residual_multiplier` before the residual add, attention scores scaled by
`attention_multiplier` (instead of 1/sqrt(head_dim)), and logits divided by `logits_scaling`."""

from litllm.hf.families.llama import FLAGS, WEIGHTS, read_biases, write_biases
from litllm.hf.family import Family, register


def read_config(hf: dict, values: dict) -> None:
    read_biases(hf, values)
    values.update(
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        attention_multiplier=float(hf.get("attention_multiplier", 1.0)),
        logits_divisor=float(hf.get("logits_scaling", 1.0)),
    )


def write_config(c, hf: dict) -> None:
    write_biases(c, hf)
    hf.update(
        embedding_multiplier=c.embedding_multiplier, residual_multiplier=c.residual_multiplier,
        attention_multiplier=c.attention_multiplier or c.head_size**-0.5, logits_scaling=c.logits_divisor,
    )


GRANITE = register(Family(
    "granite", "GraniteForCausalLM", FLAGS, WEIGHTS, presets="_granite3",
    read_config=read_config, write_config=write_config,
))
