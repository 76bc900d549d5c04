"""SmolLM3: Llama with no positional encoding (NoPE) in every 4th layer (`no_rope_layers`: 1 = RoPE,
0 = NoPE), tied embeddings by default."""

from litllm.errors import LitLLMError
from litllm.hf.families.llama import FLAGS, WEIGHTS, read_biases, write_biases
from litllm.hf.family import Family, register


def read_config(hf: dict, values: dict) -> None:
    read_biases(hf, values)
    n_layer = values["n_layer"]
    flags = hf.get("no_rope_layers")
    period = hf.get("no_rope_layer_interval", 4)
    if flags is not None:
        nope = [i for i, uses_rope in enumerate(flags) if not uses_rope]
        period = nope[0] + 1 if nope else None
        expected = [int(period is None or (i + 1) % period != 0) for i in range(n_layer)]
        if list(flags) != expected:
            raise LitLLMError(f"config.json: no_rope_layers {flags} is not one NoPE layer every k layers")
    values["nope_layer_period"] = period
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise LitLLMError("config.json: SmolLM3 with use_sliding_window is not supported")


def write_config(c, hf: dict) -> None:
    write_biases(c, hf)
    hf["no_rope_layers"] = [int(c.uses_rope(i)) for i in range(c.n_layer)]
    hf["no_rope_layer_interval"] = c.nope_layer_period or c.n_layer + 1
    hf.update(use_sliding_window=False, sliding_window=None)


SMOLLM3 = register(Family(
    "smollm3", "SmolLM3ForCausalLM", {**FLAGS, "nope_layer_period": 4}, WEIGHTS, presets="SmolLM3-3B",
    tied_by_default=True, read_config=read_config, write_config=write_config,
))
